"""vmap for the FFI calls: a batch of activations folds into M; batched weights go one by one."""

from __future__ import annotations

from collections.abc import Callable

import jax


def fold_batch(call: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Wraps ``call(a, *weights)`` (``a`` 2-D, result 2-D) with a vmap rule.

    Batched ``a`` with unbatched weights becomes one call on ``a.reshape(-1, a.shape[-1])``;
    any batched weight falls back to `jax.lax.map` (one call per batch element).
    """

    @jax.custom_batching.custom_vmap
    def f(a, *weights):
        return call(a, *weights)

    @f.def_vmap
    def _rule(axis_size, in_batched, a, *weights):
        a_b, *w_b = in_batched
        if not any(w_b):
            assert a_b  # some operand is batched
            out = f(a.reshape(-1, a.shape[-1]), *weights)
            return out.reshape(axis_size, a.shape[1], out.shape[-1]), True
        args = (a, *weights)
        batched = [v for v, b in zip(args, in_batched) if b]

        def one(bargs):
            it = iter(bargs)
            return f(*[next(it) if b else v for v, b in zip(args, in_batched)])

        return jax.lax.map(one, batched), True

    return f
