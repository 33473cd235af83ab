"""Evaluation reports: the attack grid, the sanity checks against hand-made and real results,
JSON round trip, the printed table and the progress bar."""
import dataclasses
import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from sat_tf import activations, attacks, data, evaluation, reports
from sat_tf.config import AttackConfig, DataConfig, EvalConfig, Experiment
from sat_tf.errors import UserError

SIZE = 16
DATA = DataConfig(synthetic_image_size=SIZE, synthetic_train_examples=512,
                  synthetic_eval_examples=90)


def small_net(quantize_input=False):
    inp = keras.Input((SIZE, SIZE, 3))
    x = inp
    if quantize_input:   # forward: 4 grey levels; gradient: exactly zero (masked, connected)
        x = keras.layers.Lambda(lambda t: 0.0 * t + keras.ops.stop_gradient(
            keras.ops.round(t / 85.0) * 85.0))(x)
    x = keras.layers.Rescaling(2 / 255.0, offset=-1)(x)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    x = activations.Activation("silu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(10)(x))


def train(model, steps=40):
    model.compile(keras.optimizers.Adam(0.02),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.build_dataset(DATA, split="train", batch_size=64), steps_per_epoch=steps,
              epochs=1, verbose=0, shuffle=False)
    return model


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    return train(small_net())


def eval_data(batch_size=32):
    return data.build_dataset(DATA, split="eval", batch_size=batch_size)


# ---- the attack grid -----------------------------------------------------------------------

def test_the_evaluation_attacks_are_the_full_grid_with_the_runs_own_attack():
    exp = Experiment(
        eval_attack=AttackConfig(epsilon=4.0, step_size=0.5, num_steps=20, random_start=False),
        evaluation=EvalConfig(attack_steps=(10,), attack_epsilons=(8.0, 1.0),
                              attack_modes=("untargeted", "targeted")))
    grid = exp.evaluation_attacks()
    assert len(grid) == 12
    assert {(a.mode, a.epsilon, a.num_steps) for a in grid} == {
        (m, e, s) for m in ("untargeted", "targeted") for e in (1.0, 4.0, 8.0) for s in (10, 20)}
    assert all(a.step_size == 0.5 and not a.random_start and a.clean_start_prob == 0.0
               for a in grid)
    assert reports.attack_name(grid[0]) == "PGD-10 eps 1 step 0.5 untargeted no-random-start"


def test_each_attack_method_takes_its_part_of_the_grid():
    """pgd: modes x epsilons x steps; APGD and AutoAttack: epsilons x steps (iterations), their
    own modes; Square: one per epsilon at its query budget. Names say which is which."""
    exp = Experiment(
        eval_attack=AttackConfig(epsilon=4.0, step_size=1.0, num_steps=20),
        evaluation=EvalConfig(attack_steps=(100,), attack_epsilons=(8.0,),
                              attack_modes=("untargeted", "targeted"),
                              attacks=("pgd", "apgd-ce", "apgd-t", "square", "autoattack"),
                              square_queries=1000, apgd_targets=5))
    grid = exp.evaluation_attacks()
    by = lambda m: [(a.epsilon, a.num_steps, a.mode) for a in grid if a.method == m]
    assert len(by("pgd")) == 8
    assert by("apgd-ce") == [(4.0, 20, "untargeted"), (4.0, 100, "untargeted"),
                             (8.0, 20, "untargeted"), (8.0, 100, "untargeted")]
    assert [m for _, _, m in by("apgd-t")] == ["targeted"] * 4
    assert [(e, a.queries) for a in grid if a.method == "square" for e in [a.epsilon]] == [
        (4.0, 1000), (8.0, 1000)]
    assert len(by("autoattack")) == 4
    assert all(a.num_targets == 5 and a.clean_start_prob == 0.0 for a in grid)
    first = {}
    for a in grid:
        first.setdefault(a.method, reports.attack_name(a))
    assert first == {"pgd": "PGD-20 eps 4 step 1 untargeted", "apgd-ce": "APGD-CE-20 eps 4",
                     "apgd-t": "APGD-T-20 eps 4 5 targets", "square": "Square-1000 eps 4",
                     "autoattack": "AutoAttack eps 4 (APGD-20, 5 targets, Square-1000)"}
    with pytest.raises(UserError, match="Invalid attack 'fab'; valid choices: pgd, apgd-ce, "
                                        "apgd-t, square, autoattack"):
        EvalConfig(attacks=("pgd", "fab")).validate()
    with pytest.raises(UserError, match="Invalid Square queries 0"):
        EvalConfig(square_queries=0).validate()
    with pytest.raises(UserError, match="Invalid train_attack.method 'apgd-ce'; training"):
        Experiment(train_attack=AttackConfig(method="apgd-ce")).validate()


def test_the_strongest_attacks_in_short():
    rows = lambda *cfgs: [{"config": dataclasses.asdict(c)} for c in cfgs]
    assert reports.strongest(rows(AttackConfig(num_steps=10), AttackConfig(num_steps=200))) \
        == "PGD-200"
    assert reports.strongest(rows(AttackConfig(num_steps=20),
                                  AttackConfig(num_steps=100, method="autoattack"),
                                  AttackConfig(method="square", queries=5000))) == \
        "PGD-20+AutoAttack-100+Square-5000"
    old = {"config": {"epsilon": 4.0, "num_steps": 10}}       # a report from before --attacks
    assert reports.strongest([old]) == "PGD-10" and reports.strongest([]) == "PGD-0"


def test_large_epsilon_attack_can_cross_the_ball():
    a = reports.large_epsilon_attack(64.0)
    assert a.epsilon == 64.0 and a.num_steps * a.step_size >= 2 * a.epsilon
    with pytest.raises(ValueError, match="epsilon"):
        reports.large_epsilon_attack(0.0)


# ---- sanity checks on hand-made results ----------------------------------------------------

def fake(attacks, clean=0.8, robust=None, diagnostic=(), zero=0.0, n=1000):
    def entry(steps, eps, acc, mode="untargeted", adv=None):
        return {"config": {"epsilon": eps, "step_size": 1.0, "num_steps": steps,
                           "random_start": True, "clean_start_prob": 0.0, "mode": mode,
                           "backward": None},
                "restarts": 1, "accuracy": acc, "correct": int(acc * n),
                "adversarial_accuracy": acc if adv is None else adv,
                "adversarial_correct": int((acc if adv is None else adv) * n)}
    atts = [entry(*a) for a in attacks]
    return {"examples": n, "clean_top1": clean, "clean_top5": 0.9, "clean_correct": int(clean * n),
            "attacks": atts, "diagnostic_attacks": [entry(*a) for a in diagnostic],
            "robust": min([a["accuracy"] for a in atts] + [clean]) if robust is None else robust,
            "robust_correct": 0, "zero_gradient_fraction": zero,
            "nonfinite_gradient_fraction": 0.0, "seconds": 1.0, "batches": 1}


def statuses(result):
    return {c["name"]: c["status"] for c in reports.sanity_checks(result)}


def test_checks_pass_on_a_consistent_result():
    r = fake([(10, 4.0, 0.40), (50, 4.0, 0.38), (10, 8.0, 0.20), (50, 8.0, 0.18),
              (10, 4.0, 0.55, "targeted"), (50, 4.0, 0.50, "targeted")],
             diagnostic=[(20, 64.0, 0.0)])
    assert statuses(r) == {"robust_le_clean": "pass", "monotone_in_steps": "pass",
                           "monotone_in_epsilon": "pass", "large_epsilon": "pass",
                           "gradient_masking": "pass", "targeted_weaker": "pass"}
    assert reports.overall_status(reports.sanity_checks(r)) == "pass"


def test_more_steps_helping_is_a_warning_and_larger_epsilon_helping_a_failure():
    r = fake([(10, 4.0, 0.30), (50, 4.0, 0.40), (10, 8.0, 0.35), (50, 8.0, 0.41)])
    checks = {c["name"]: c for c in reports.sanity_checks(r)}
    assert checks["monotone_in_steps"]["status"] == "warn"
    assert "more steps help the model" in checks["monotone_in_steps"]["detail"]
    assert checks["monotone_in_epsilon"]["status"] == "fail"
    assert checks["large_epsilon"]["status"] == "skipped"
    assert checks["targeted_weaker"]["status"] == "skipped"
    assert reports.overall_status(list(checks.values())) == "fail"


def test_differences_within_noise_pass():
    r = fake([(10, 4.0, 0.300), (50, 4.0, 0.302)], n=1000)   # 2 examples: noise
    assert statuses(r)["monotone_in_steps"] == "pass"
    r = fake([(10, 4.0, 0.300), (50, 4.0, 0.310)], n=1000)   # 10 examples: not noise
    assert statuses(r)["monotone_in_steps"] == "warn"


def test_attack_above_clean_fails():
    r = fake([(10, 4.0, 0.5, "untargeted", 0.9)], clean=0.8)
    assert statuses(r)["robust_le_clean"] == "fail"
    # A targeted attack may move a misclassified image onto its true class.
    r = fake([(10, 4.0, 0.5, "untargeted", 0.7), (10, 4.0, 0.6, "targeted", 0.85)], clean=0.8)
    assert statuses(r)["robust_le_clean"] == "pass"


def test_large_epsilon_must_reach_zero_and_masking_warns():
    r = fake([(10, 4.0, 0.4)], diagnostic=[(20, 64.0, 0.3)], zero=0.5)
    s = statuses(r)
    assert s["large_epsilon"] == "fail" and s["gradient_masking"] == "warn"


def test_targeted_stronger_than_untargeted_warns():
    r = fake([(10, 4.0, 0.4), (10, 4.0, 0.2, "targeted")])
    assert statuses(r)["targeted_weaker"] == "warn"


# ---- real evaluations ----------------------------------------------------------------------

def test_report_from_a_real_evaluation(trained, tmp_path):
    exp = Experiment(eval_attack=AttackConfig(epsilon=2.0, step_size=2.0, num_steps=1),
                     evaluation=EvalConfig(attack_steps=(5,), attack_epsilons=(8.0,),
                                           attack_modes=("untargeted", "targeted")))
    grid = exp.evaluation_attacks()
    cfg = exp.evaluation
    calls = []
    result = evaluation.evaluate(trained, eval_data(), grid, seed=3,
                                 diagnostic_attacks=[reports.large_epsilon_attack()],
                                 progress=lambda b, n: calls.append((b, n)))
    assert calls == [(1, 32), (2, 64), (3, 90)]
    # Independent truth: the clean count straight from the model over the 90 examples.
    x, y, m = (np.concatenate(t) for t in zip(*[(a.numpy(), b.numpy(), c.numpy())
                                                for a, b, c in eval_data()]))
    pred = np.argmax(trained.predict(x, verbose=0), -1)
    assert result["examples"] == 90 and result["clean_correct"] == int(np.sum((pred == y) * m))
    assert len(result["attacks"]) == 8 and len(result["diagnostic_attacks"]) == 1
    for a in result["attacks"]:
        assert a["correct"] <= a["adversarial_correct"]
        assert a["correct"] <= result["clean_correct"]
    assert result["robust_correct"] <= min(a["correct"] for a in result["attacks"])
    # The diagnostic attack (PGD-20 at epsilon 64 fools every example) is kept out of the
    # worst case, which is the per-example AND over the 8 attacks: at most the weakest
    # attack's count, and at least clean minus every attack's losses (a union bound).
    assert result["diagnostic_attacks"][0]["correct"] < result["robust_correct"]
    assert result["robust_correct"] >= result["clean_correct"] - sum(
        result["clean_correct"] - a["correct"] for a in result["attacks"])

    report = reports.build_report(
        result, model={"name": "small-net", "activation": "silu", "step": 40, "weights": "raw"},
        data={"dataset": "synthetic"}, protocol={"seed": 3, **cfg.__dict__},
        paper={"source": "none", "clean": 70.0, "robust": 40.0, "robust_attack": "PGD-10"})
    checks = {c["name"]: c["status"] for c in report["sanity_checks"]}
    assert checks["robust_le_clean"] == "pass" and checks["monotone_in_epsilon"] == "pass"
    assert checks["large_epsilon"] == "pass" and checks["gradient_masking"] == "pass"
    assert checks["monotone_in_steps"] in ("pass", "warn")

    path = tmp_path / "reports" / "r.json"
    reports.write_json(report, str(path))
    again = reports.read_json(str(path))
    assert again == json.loads(json.dumps(report))
    assert again["attacks"][0]["name"] == "PGD-1 eps 2 step 2 untargeted"

    table = reports.format_table(report)
    assert "clean top-1" in table and "robust (worst of 8)" in table
    assert f"{result['clean_correct']}/90" in table
    assert "[check] PGD-20 eps 64 step 8 untargeted x1" in table
    assert "paper (none): clean 70.0%, robust 40.0%" in table


def test_read_json_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{}")
    with pytest.raises(ValueError, match="not a sat_tf evaluation report"):
        reports.read_json(str(p))


def test_gradient_masking_is_detected():
    keras.utils.set_random_seed(1)
    masked = train(small_net(quantize_input=True), steps=20)
    with tf.GradientTape() as tape:
        x = tf.random.uniform([2, SIZE, SIZE, 3], 0, 255)
        tape.watch(x)
        y = masked(x)
    assert np.all(tape.gradient(y, x).numpy() == 0.0)   # the premise: the gradient is masked
    attack = AttackConfig(epsilon=4.0, step_size=1.0, num_steps=5, random_start=False,
                          clean_start_prob=0.0)
    result = evaluation.evaluate(masked, eval_data(), [attack],
                                 diagnostic_attacks=[reports.large_epsilon_attack(
                                     random_start=False)])
    checks = {c["name"]: c["status"] for c in reports.sanity_checks(result)}
    assert result["zero_gradient_fraction"] == 1.0
    assert checks["gradient_masking"] == "warn"
    # Without a gradient PGD never moves: the "robust" accuracy is the clean one ...
    assert result["robust_correct"] == result["clean_correct"] > 0
    # ... and the large-epsilon check exposes it.
    assert checks["large_epsilon"] == "fail"


def test_progress_bar():
    out = io.StringIO()
    bar = reports.ProgressBar(200, stream=out, min_interval=0.0)
    bar.start = 100.0
    assert bar.line(50, now=110.0) == (
        "[#######                       ] 50/200  25.0% 00:10 elapsed, ETA 00:30, 5.0 ex/s")
    bar(1, 200)
    assert out.getvalue().endswith("\n")
    open_ended = reports.ProgressBar(None, stream=out, min_interval=0.0)
    assert open_ended.line(10).startswith("10 examples")
    open_ended(1, 10)
    open_ended.close()
    assert out.getvalue().endswith("\n")


def test_a_single_batch_and_no_attacks(trained):
    result = evaluation.evaluate(trained, eval_data(), [], max_batches=1)
    assert (result["examples"], result["batches"], result["attacks"]) == (32, 1, [])
    assert result["robust_correct"] == result["clean_correct"]


def test_pad_forever_appends_endless_padding():
    ds = tf.data.Dataset.range(3).map(
        lambda i: (tf.fill([2, 1], tf.cast(i, tf.float32)), tf.fill([2], i), tf.ones([2])))
    padded = list(evaluation.pad_forever(ds).take(6))
    assert [int(b[1][0]) for b in padded[:3]] == [0, 1, 2]
    for images, labels, mask in padded[3:]:
        assert images.shape == (2, 1) and float(tf.reduce_sum(mask)) == 0.0
    with pytest.raises(ValueError, match="static batch shapes"):
        evaluation.pad_forever(ds.unbatch().batch(2))


def test_hosts_with_unequal_batch_counts_cover_the_split_exactly():
    """41 examples, 4 hosts of one replica, per-replica batch 5: the hosts hold 3, 2, 2 and 2
    batches. Every host runs the same steps (padding after its last batch) and the loop ends
    at the first step without a real example on any host, as ``Evaluator`` does."""
    cfg = DataConfig(dataset="synthetic", synthetic_eval_examples=41, synthetic_image_size=4)
    streams = []
    for host in range(4):
        ctx = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=host,
                                         num_replicas_in_sync=4)
        ds = data.build_dataset(cfg, split="eval", batch_size=5, input_context=ctx)
        streams.append(iter(evaluation.pad_forever(ds)))
    seen, steps = 0.0, 0
    while True:
        masks = [float(tf.reduce_sum(next(s)[2])) for s in streams]
        if sum(masks) == 0:
            break
        seen, steps = seen + sum(masks), steps + 1
    assert seen == 41 and steps == 3


def test_two_replicas_cover_the_whole_split(trained):
    """90 examples in per-replica batches of 10: 9 batches for 2 replicas."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    build = lambda **kw: data.build_dataset(DATA, split="eval", **kw)
    one = evaluation.evaluate(trained, eval_data(), [])
    two = evaluation.evaluate(trained, evaluation.distribute_eval_dataset(strategy, build, 20),
                              [], strategy=strategy)
    assert two["examples"] == one["examples"] == 90
    assert two["clean_correct"] == one["clean_correct"]
    # The premise: without the padding, distribute_datasets_from_function drops the 9th batch.
    bare = strategy.distribute_datasets_from_function(
        lambda ctx: build(batch_size=10, input_context=ctx))
    assert evaluation.evaluate(trained, bare, [], strategy=strategy)["examples"] == 80


def test_attacks_share_random_draws(trained):
    """Restart r of every attack uses the same random start and targets, whatever else is
    evaluated with it: an attack gets the same counts at any position in the list, for every
    seed (attack comparisons are not blurred by different draws)."""
    a = AttackConfig(epsilon=32.0, step_size=8.0, num_steps=2, random_start=True,
                     clean_start_prob=0.0, mode="targeted")
    b = AttackConfig(epsilon=16.0, step_size=8.0, num_steps=2, random_start=True,
                     clean_start_prob=0.0)
    counts = lambda r: (r["correct"], r["adversarial_correct"])
    for seed in (11, 12):
        first, other, again = evaluation.evaluate(trained, eval_data(), [a, b, a],
                                                  seed=seed)["attacks"]
        assert counts(first) == counts(again)
        assert first["config"] == again["config"] != other["config"]


# ---- restarts and diagnostic attacks against per-example truth -----------------------------

def _per_example_truth(model, cfg, seed, restarts):
    """(clean correct, correct under restart r) per real example of eval_data(), from
    attacks.pgd with the documented seeds: batch b on replica 0 attacks with
    s = fold_in((seed, b), 0), restart r with fold_in(s, r)."""
    fold = lambda s, i: tf.random.experimental.stateless_fold_in(s, i, alg=attacks.RNG_ALG)
    predict = lambda x: np.argmax(model(x, training=False).numpy(), -1)
    clean, per_restart = [], []
    for b, (images, labels, mask) in enumerate(eval_data()):
        s = fold(tf.constant([seed, b], tf.int64), 0)
        real = mask.numpy() > 0
        clean.append((predict(images) == labels.numpy())[real])
        per_restart.append(np.stack([
            predict(attacks.pgd(model, images, labels, cfg, seed=fold(s, r))) == labels.numpy()
            for r in range(restarts)])[:, real])
    return np.concatenate(clean), np.concatenate(per_restart, axis=1)


def test_restarts_count_an_example_only_if_no_restart_fools_it(trained):
    cfg = AttackConfig(epsilon=24.0, step_size=24.0, num_steps=1, random_start=True,
                       clean_start_prob=0.0)
    clean, per_restart = _per_example_truth(trained, cfg, seed=5, restarts=4)
    survives_all = per_restart.all(axis=0)
    # The premise: every restart alone spares examples that another restart fools (so the
    # last restart alone, or one draw repeated, would count more).
    assert survives_all.sum() < per_restart.sum(axis=1).min(), per_restart.sum(axis=1)
    four = evaluation.evaluate(trained, eval_data(), [cfg], restarts=4, seed=5)
    one = evaluation.evaluate(trained, eval_data(), [cfg], restarts=1, seed=5)
    attack = four["attacks"][0]
    assert attack["restarts"] == 4 and four["examples"] == len(clean) == 90
    assert attack["adversarial_correct"] == survives_all.sum()
    assert attack["correct"] == four["robust_correct"] == (clean & survives_all).sum()
    assert one["robust_correct"] == (clean & per_restart[0]).sum()
    assert four["robust_correct"] < one["robust_correct"]


def test_diagnostic_attacks_stay_out_of_the_robust_count(trained):
    weak = AttackConfig(epsilon=1.0, step_size=1.0, num_steps=1, random_start=False,
                        clean_start_prob=0.0)
    strong = AttackConfig(epsilon=64.0, step_size=32.0, num_steps=2, random_start=False,
                          clean_start_prob=0.0)
    result = evaluation.evaluate(trained, eval_data(), [weak], diagnostic_attacks=[strong],
                                 max_batches=1)
    assert result["diagnostic_attacks"][0]["correct"] < result["attacks"][0]["correct"]
    assert result["robust_correct"] == result["attacks"][0]["correct"]
