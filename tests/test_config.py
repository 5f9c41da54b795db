"""EXO_FUSED_MOE, the enabled= override, and the log line servers grep for."""

import logging

import pytest
from helpers import switch_glu

import moefuse_runtime
from moefuse_runtime.config import env_flag


@pytest.mark.parametrize("value", ["0", "false", "off", "OFF", " False ", "no"])
def test_off_values_disable(monkeypatch, value):
    monkeypatch.setenv("EXO_FUSED_MOE", value)
    layer = switch_glu()
    report = moefuse_runtime.install(layer)
    assert report.fused == () and not moefuse_runtime.is_fused(layer)
    assert report.disabled_reason == "disabled by EXO_FUSED_MOE=0"
    assert report.skipped == {"": "disabled by EXO_FUSED_MOE=0"}
    assert "disabled by EXO_FUSED_MOE=0" in report.summary()


@pytest.mark.parametrize("value", ["1", "true", "on", "TRUE", "yes", ""])
def test_on_values_and_empty_enable(monkeypatch, value):
    monkeypatch.setenv("EXO_FUSED_MOE", value)
    assert moefuse_runtime.install(switch_glu(), reserve_bytes=0).fused == ("",)


def test_unset_enables(monkeypatch):
    monkeypatch.delenv("EXO_FUSED_MOE", raising=False)
    assert moefuse_runtime.install(switch_glu(), reserve_bytes=0).fused == ("",)


@pytest.mark.parametrize("value", ["2", "ture", "enabled", "-1"])
def test_other_values_are_an_error(monkeypatch, value):
    monkeypatch.setenv("EXO_FUSED_MOE", value)
    with pytest.raises(ValueError, match="EXO_FUSED_MOE="):
        moefuse_runtime.install(switch_glu())


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("EXO_FUSED_MOE", "0")
    assert moefuse_runtime.install(switch_glu(), enabled=True, reserve_bytes=0).fused == ("",)
    monkeypatch.setenv("EXO_FUSED_MOE", "1")
    report = moefuse_runtime.install(switch_glu(), enabled=False)
    assert report.fused == () and report.disabled_reason == "disabled by enabled=False"


def test_env_flag_default():
    assert env_flag("MOEFUSE_SURELY_UNSET_VARIABLE", default=True) is True


def test_one_info_line_and_debug_per_layer(caplog):
    caplog.set_level(logging.DEBUG, logger="moefuse_runtime")
    moefuse_runtime.install(switch_glu(), reserve_bytes=0)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    debugs = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(infos) == 1 and "fused 1/1 SwitchGLU layers" in infos[0].getMessage()
    assert all(r.name.startswith("moefuse_runtime") for r in caplog.records)
    assert len(debugs) == 1


def test_report_table_is_readable():
    report = moefuse_runtime.install(switch_glu(), reserve_bytes=0)
    text = str(report).splitlines()
    header = ["layer", "type", "outcome", "kind", "gate+up", "reason or compute path"]
    assert text[0].split() == " ".join(header).split()
    assert "fused" in text[1] and "float32" in text[1]
    assert text[1].endswith("gather_qmm (cpu)")  # a fused layer names its path
    assert text[-1] == report.summary()


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    from test_memory import stack

    model = stack(layers=8, dims=64, hidden=64)
    moefuse_runtime.install(model, reserve_bytes=0)
    assert "moefuse install" not in capsys.readouterr().err
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    moefuse_runtime.uninstall(model)
    assert "moefuse uninstall" in capsys.readouterr().err
