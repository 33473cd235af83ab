"""The Square attack (Andriushchenko et al., "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020), L-infinity, in pixel units.

Gradient-free: it only calls the model forward (``training=False``), so it is the attack that
masked, shattered or useless gradients cannot stop. A pure function like
:func:`sat_tf.attacks.pgd`: stateless random numbers from ``seed``, a graph loop, usable
eagerly, inside ``strategy.run`` and under ``jit_compile=True``.

The search, per example, on the margin loss m(x) = z_y − max_{i≠y} z_i:

* start: vertical stripes, every column of every channel at x ± ε (random signs);
* each query: a random square window of side s (uniform position), every channel of it set to
  x ± ε (a random sign per channel), projected into [0, 255]; the candidate is kept when it
  lowers the margin; the example is done once its margin is < 0 (misclassified; the paper's
  code stops at ≤ 0, where a tie may still be classified correctly);
* s = round(sqrt(p · H · W)), at least 1 and at most the image's side, with p = p_init
  (0.8) halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000 queries:
  :func:`fraction`. Alone (``--attacks=square``) the schedule is rescaled to the budget, as in
  the Square paper's code; in AutoAttack's sequence it counts raw queries, as AutoAttack runs
  it (``resc_schedule=False``: at 5,000 queries p ends at p_init / 128).

Departures from the authors' code (fra31/auto-attack and the original Square release):

* the window and signs are drawn per example, as in the paper's algorithm (the AutoAttack code
  draws one window for the whole batch);
* the window's corner is uniform over all h − s + 1 rows and w − s + 1 columns (their
  ``randint(0, h - s)`` never places a window on the last row or column: on 8×8 images 15 of
  64 pixels were out of its reach, and ART's copy of it was 13 points weaker on the digits of
  tests/test_autoattack_reference.py);
* signs that would change nothing in the window are redrawn up to 8 times (theirs: until
  something changes).

The query budget counts every forward pass an example takes, the start's included.
"""
from __future__ import annotations

import math

import tensorflow as tf

from sat_tf.attacks import PIXEL_MAX, PIXEL_MIN, RNG_ALG, _logits, _seed, fold

P_INIT = 0.8
SIGN_ATTEMPTS = 8
# Queries (of 10,000) after which p halves; the schedule is rescaled to the budget.
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def fraction(query, num_queries: int, p_init: float = P_INIT, rescale: bool = True):
    """The fraction p of the image a window covers at ``query`` (0-based, after the start):
    the halvings at the :data:`HALVINGS` of 10,000 queries, rescaled to ``num_queries`` (the
    Square paper's code) or at those raw query counts (``rescale=False``: AutoAttack's)."""
    it = tf.cast(query, tf.float32)
    if rescale:
        it = tf.floor(it / float(num_queries) * 10000.0)
    halvings = tf.reduce_sum(tf.cast(it > tf.constant(HALVINGS, tf.float32), tf.float32))
    return p_init / tf.pow(2.0, halvings)


def margin(logits, labels):
    """z_y − max_{i≠y} z_i per example (< 0: misclassified)."""
    logits = tf.cast(logits, tf.float32)
    onehot = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    z_y = tf.reduce_sum(tf.where(onehot, logits, 0.0), axis=-1)
    return z_y - tf.reduce_max(tf.where(onehot, -float("inf"), logits), axis=-1)


def square(model, images, labels, *, epsilon: float, num_queries: int = 5000,
           p_init: float = P_INIT, seed=None, active=None, rescale_schedule: bool = True,
           return_queries: bool = False):
    """The L-infinity Square attack with at most ``num_queries`` forward passes per example.

    ``active``: a bool [batch]; the other examples are left at their start, count no query and
    do not keep the search going. ``rescale_schedule``: see :func:`fraction`.

    Returns ``tf.stop_gradient`` of the adversarial images inside [x − ε, x + ε] ∩ [0, 255]
    (a misclassified point where one was found, else the lowest-margin point), and with
    ``return_queries`` also the float32 [batch] number of forward passes each example took.
    """
    x = tf.convert_to_tensor(images, tf.float32)
    labels = tf.cast(labels, tf.int32)
    eps = tf.constant(float(epsilon), tf.float32)
    seed = _seed(seed)
    _, h, w, c = x.shape
    query = lambda x_adv: margin(_logits(model, x_adv), labels)
    batch = tf.shape(x)[0]

    stripes = _random_signs(tf.stack([batch, 1, w, c]), fold(seed, 0))
    x_best = tf.clip_by_value(x + eps * stripes, PIXEL_MIN, PIXEL_MAX)
    m_best = query(x_best)
    queries = tf.ones_like(m_best)
    if active is not None:
        m_best = tf.where(active, m_best, -float("inf"))
        queries = tf.cast(active, tf.float32)
    if num_queries <= 1:
        return _out(x_best, queries, return_queries)

    rows = tf.reshape(tf.range(h, dtype=tf.float32), [1, h, 1, 1])
    cols = tf.reshape(tf.range(w, dtype=tf.float32), [1, 1, w, 1])

    def body(i, x_best, m_best, queries):
        s = tf.round(tf.sqrt(fraction(i, num_queries, p_init, rescale_schedule) * float(h * w)))
        s = tf.clip_by_value(s, 1.0, float(min(h, w)))
        draw = fold(seed, i + 1)
        corner = tf.floor(tf.random.stateless_uniform(
            tf.stack([batch, 2]), draw, alg=RNG_ALG) * (tf.constant([h, w], tf.float32) - s + 1.0))
        top = tf.reshape(corner[:, 0], [-1, 1, 1, 1])
        left = tf.reshape(corner[:, 1], [-1, 1, 1, 1])
        window = ((rows >= top) & (rows < top + s)) & ((cols >= left) & (cols < left + s))
        signs = _changing_signs(x, x_best, window, eps, fold(draw, 1))
        candidate = tf.where(window, tf.clip_by_value(x + eps * signs, PIXEL_MIN, PIXEL_MAX),
                             x_best)
        active = m_best >= 0.0
        m_new = query(candidate)
        keep = tf.logical_and(active, m_new < m_best)
        x_best = tf.where(tf.reshape(keep, [-1, 1, 1, 1]), candidate, x_best)
        return (i + 1, x_best, tf.where(keep, m_new, m_best),
                queries + tf.cast(active, tf.float32))

    _, x_best, m_best, queries = tf.while_loop(
        lambda i, _x, m, _q: tf.logical_and(i < num_queries - 1, tf.reduce_any(m >= 0.0)),
        body, (tf.constant(0), x_best, m_best, queries), maximum_iterations=num_queries - 1)
    return _out(x_best, queries, return_queries)


def _random_signs(shape, seed):
    """Fair ±1 of ``shape``."""
    return tf.where(tf.random.stateless_uniform(shape, seed, alg=RNG_ALG) < 0.5, -1.0, 1.0)


def _changing_signs(x, x_best, window, eps, seed, attempts: int = SIGN_ATTEMPTS):
    """[batch, 1, 1, C] random channel signs for the window, redrawn (up to ``attempts``
    draws) where a draw would leave the window as it is: a query that changes nothing is
    wasted (the authors' code redraws until something changes)."""
    # [batch, C]: is every window pixel of the channel already at x + bound?
    already_at = lambda bound: tf.reduce_all(
        tf.logical_or(tf.logical_not(window), tf.equal(
            x_best, tf.clip_by_value(x + bound, PIXEL_MIN, PIXEL_MAX))), axis=[1, 2])
    at_plus, at_minus = already_at(eps), already_at(-eps)
    shape = tf.concat([[attempts], tf.shape(at_plus)], 0)
    draws = _random_signs(shape, seed)
    unchanged = tf.reduce_all(tf.where(draws > 0, at_plus[None], at_minus[None]), axis=-1)
    first = tf.argmax(tf.cast(tf.logical_not(unchanged), tf.int32), axis=0, output_type=tf.int32)
    chosen = tf.gather(tf.transpose(draws, [1, 0, 2]), first, batch_dims=1)   # [batch, C]
    return chosen[:, None, None, :]


def _out(x_best, queries, return_queries):
    x_best = tf.stop_gradient(x_best)
    return (x_best, queries) if return_queries else x_best


def window_side(query: int, num_queries: int, height: int, width: int,
                p_init: float = P_INIT) -> int:
    """The window's side at ``query`` (plain Python, for reading and tests)."""
    p = float(fraction(query, num_queries, p_init))
    return int(min(max(round(math.sqrt(p * height * width)), 1), min(height, width)))
