"""The evaluation request behind run/eval.py, without TensorFlow: the run's own attack joins
its protocol, given values win and are named, other data drops the run's data facts, bad values
and report paths fail in one line, the report's default place. (sat_tf.robustness.evaluate
runs in tests/test_eval_cli.py, on a trained run.)"""
import json
import os
import subprocess
import sys

import pytest

from sat_tf import loading, robustness
from sat_tf.config import AttackConfig, DataConfig, EvalConfig, Experiment, RuntimeConfig
from sat_tf.errors import UserError

RUN = Experiment(
    name="run", data=DataConfig(dataset="synthetic", num_classes=10, num_eval_examples=40),
    eval_attack=AttackConfig(epsilon=16.0, step_size=4.0, num_steps=10, random_start=False),
    evaluation=EvalConfig(attack_steps=(10, 20, 50), attack_epsilons=(4.0,)),
    paper={"clean": 50.0})


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / loading.EXPERIMENT_FILE).write_text(json.dumps(RUN.to_dict()))
    return str(tmp_path)


def request(run_dir, **kwargs):
    return robustness.EvalRequest(loading.resolve(model_dir=run_dir), **kwargs)


def test_the_runs_own_attack_joins_its_protocol(run_dir):
    exp = request(run_dir).experiment(RUN)
    assert exp.evaluation_grid() == ((10, 20, 50), (4.0, 16.0))
    attacks = exp.evaluation_attacks()
    assert [(a.epsilon, a.num_steps) for a in attacks] == [
        (4.0, 10), (4.0, 20), (4.0, 50), (16.0, 10), (16.0, 20), (16.0, 50)]
    assert all(a.step_size == 4.0 and not a.random_start and a.clean_start_prob == 0.0
               for a in attacks)
    assert exp.paper == {"clean": 50.0}


def test_given_values_win_and_are_named(run_dir):
    protocol = robustness.ProtocolOverrides(attack_epsilons=(8.0,), seed=3, sanity_epsilon=0.0,
                                            random_start=True)
    exp = request(run_dir, protocol=protocol).experiment(RUN)
    cfg = exp.evaluation
    assert exp.evaluation_grid() == ((10, 20, 50), (8.0,))   # the epsilons given, only
    assert (cfg.seed, exp.eval_attack.random_start) == (3, True)
    assert cfg.sanity_epsilon is None          # 0 turns the sanity attack off
    assert exp.eval_attack.step_size == 4.0    # not given: the run's own
    assert protocol.given() == ["attack_epsilons", "random_start", "sanity_epsilon", "seed"]
    assert robustness.ProtocolOverrides().given() == []


def test_without_a_run_the_defaults_take_the_overrides(run_dir):
    protocol = robustness.ProtocolOverrides(attack_steps=(5,))
    exp = request(run_dir, protocol=protocol).experiment(None)
    assert exp.evaluation_grid() == ((5,), (Experiment().eval_attack.epsilon,))


def test_other_data_drops_the_runs_data_facts(run_dir):
    same = robustness.DataOverrides(preprocessing="resize", skip_corrupt=True)
    data = request(run_dir, data=same).experiment(RUN).data
    assert (data.preprocessing, data.skip_corrupt, data.num_classes, data.num_eval_examples) == (
        "resize", True, 10, 40)
    for other in (robustness.DataOverrides(dataset="cifar10"),
                  robustness.DataOverrides(data_dir="/elsewhere"),
                  robustness.DataOverrides(source="tfrecord")):
        data = request(run_dir, data=other).experiment(RUN).data
        assert [getattr(data, fact) for fact in robustness.DATA_FACTS] == [None] * 5
    # A preprocessing given with other data is kept (the run's own is dropped).
    other = robustness.DataOverrides(dataset="imagenet", data_dir="/x", preprocessing="resize")
    assert request(run_dir, data=other).experiment(RUN).data.preprocessing == "resize"


def test_bad_values_fail_in_one_line(run_dir, tmp_path):
    cases = [
        (dict(protocol=robustness.ProtocolOverrides(attack_epsilons=(-1.0,))),
         "Invalid attack epsilon -1.0"),
        (dict(data=robustness.DataOverrides(dataset="mnist")), "Invalid dataset 'mnist'"),
        (dict(runtime=RuntimeConfig(strategy="warp")), "Invalid strategy 'warp'"),
        (dict(report=str(tmp_path)), "it is a folder"),
        (dict(report=str(tmp_path / "no" / "r.json")), "does not exist"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            request(run_dir, **kwargs).validate()
        assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        robustness.check_report_path(str(tmp_path))
    request(run_dir, report=str(tmp_path / "r.json")).validate()
    robustness.check_report_path("gs://bucket/r.json")   # checked when written


def test_a_remote_runs_data_is_checked_once_read():
    source = loading.Source("checkpoint", "gs://bucket/run", None)
    bad_data = robustness.EvalRequest(source, data=robustness.DataOverrides(dataset="mnist"))
    bad_data.validate()
    with pytest.raises(ValueError, match="Invalid dataset 'mnist'"):
        bad_data.experiment(RUN).data.validate()


def test_where_the_report_goes(run_dir, tmp_path):
    assert request(run_dir).report_path(7) == os.path.join(run_dir, "eval_report_step7.json")
    assert request(run_dir, report="r.json").report_path(7) == "r.json"
    export_dir = tmp_path / "export"
    (export_dir / "assets").mkdir(parents=True)
    (export_dir / "saved_model.pb").write_bytes(b"")
    (export_dir / loading.EXPORT_METADATA).write_text("{}")
    saved = robustness.EvalRequest(loading.resolve(saved_model=str(export_dir)))
    assert saved.report_path(7) == "eval_report.json"


def test_a_request_needs_no_tensorflow(run_dir):
    code = (f"from sat_tf import loading, robustness; import sys; "
            f"robustness.EvalRequest(loading.resolve(model_dir={run_dir!r})).validate(); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
