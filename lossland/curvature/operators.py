"""Turning a matvec and a solver body into one compiled program.

Owns `compiled_call`, which every solver uses so that an eager call runs
compiled end to end and the operator's arrays are jit arguments, never
constants baked into the program.
"""

from __future__ import annotations

from typing import Callable

import jax


def compiled_call(body: Callable, matvec: Callable, example: jax.Array, *args):
    """body(matvec, *args) as one `jax.jit` program.

    matvec is traced once to a jaxpr whose closed-over arrays (params, data,
    or tracers of a caller's jit) become arguments of the jitted program,
    never constants baked into it. Eager calls thus run compiled end to end
    (not op by op around the loop), and inside a caller's jit this is just
    an inlined nested jit.
    """
    closed = jax.make_jaxpr(matvec)(example)
    if len(closed.out_avals) != 1 or closed.out_avals[0].shape != example.shape:
        raise ValueError(f"matvec must map a {example.shape} vector to one {example.shape} "
                         f"vector; got outputs {closed.out_avals}.")
    jaxpr = closed.jaxpr

    def run(consts, *args):
        def hoisted(v):
            return jax.core.eval_jaxpr(jaxpr, consts, v)[0]
        return body(hoisted, *args)

    return jax.jit(run)(closed.consts, *args)
