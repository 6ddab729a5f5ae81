"""The registry walk every op shares: which implementation runs, on each platform, and why not the others.

An op lists its implementations in order of preference (`Implementation`). For each lowering
platform (`ltjax._platform.PLATFORMS`, then any other) the first one whose predicate returns
None wins; the program holds one choice per platform and the compiler keeps the branch of the
platform it compiles for (`per_platform`). A forced implementation that cannot run raises
``ValueError`` with its reason; off its platforms it runs emulated where it has an emulation
(Pallas interpret mode, the CUDA kernels' CPU emulation). Fallbacks on this host's platform are
logged once (`ltjax._config.log_once`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ltjax._config import host_platform, log_once
from ltjax._platform import PLATFORMS, per_platform as _per_platform

ANYWHERE = None  # `Implementation.platforms` of one that runs on every platform


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to run an op.

    Attributes:
      name: what ``impl=`` calls it.
      platforms: the platforms it runs on natively (`ANYWHERE`: all).
      emulated: whether, forced off its platforms, it runs in an emulation (for tests).
      why_not: ``(*args, platform, interpret) -> str | None``: None when it can run these arguments
        on ``platform`` (emulated if ``interpret``), else the reason it cannot.
      run: the call itself, ``(*args, interpret) -> result``.
      prefer: ``(*args, platform) -> str | None``: why ``impl=None`` passes it over although it
        can run (an opt-in, or a measured heuristic such as an M above which another path is
        faster); forcing it does not ask.
    """

    name: str
    platforms: tuple[str, ...] | None
    emulated: bool
    why_not: Callable[..., str | None]
    run: Callable[..., Any]
    prefer: Callable[..., str | None] | None = None

    def reason(self, *args, platform: str, interpret: bool = False) -> str | None:
        """None when it can run on ``platform``, else why not (the platform first, then its own predicate)."""
        if not interpret and self.platforms is not ANYWHERE and platform not in self.platforms:
            return f"runs on {'/'.join(self.platforms)}; the platform is {platform!r}"
        return self.why_not(*args, platform=platform, interpret=interpret)

    def default_reason(self, *args, platform: str) -> str | None:
        """`reason` for ``impl=None``: also None only where `prefer` has nothing against it."""
        why = self.prefer(*args, platform=platform) if self.prefer is not None else None
        return why if why is not None else self.reason(*args, platform=platform)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    """One implementation, and whether it runs emulated: hashable, a static argument of the op's VJP."""

    impl: str
    interpret: bool = False


def choose(registry: Sequence[Implementation], args: tuple, platform: str, *, what: str) -> Config:
    """The first implementation in ``registry`` that can run ``args`` on ``platform``."""
    log = platform == host_platform()
    for impl in registry:
        if impl.prefer is not None and impl.prefer(*args, platform=platform) is not None:
            continue  # passed over by choice (opt-in, a measured crossover), not a fallback: `explain` says it
        why = impl.reason(*args, platform=platform)
        if why is None:
            return Config(impl.name)
        if log and (impl.platforms is ANYWHERE or platform in impl.platforms):  # a path of this platform said no
            log_once(why, "ltjax: %s falls back from %s: %s", what, impl.name, why)  # once per reason
    raise AssertionError(f"{what}: the last implementation ({registry[-1].name}) must run anywhere")


def forced(registry: Sequence[Implementation], name: str, args: tuple, *, what: str) -> Config:
    """``impl=name``: that implementation on this host (emulated off its platforms), or ``ValueError`` with why not."""
    by_name = {i.name: i for i in registry}
    if name not in by_name:
        raise ValueError(f"impl={name!r} is not an implementation of {what}; choose one of {tuple(by_name)} or None")
    impl, platform = by_name[name], host_platform()
    interpret = impl.emulated and impl.platforms is not ANYWHERE and platform not in impl.platforms
    why = impl.reason(*args, platform=platform, interpret=interpret)
    if why is not None:
        raise ValueError(f"impl={name!r} cannot run {what} here: {why}")
    return Config(name, interpret)


def reasons(registry: Sequence[Implementation], args: tuple, platform: str) -> dict[str, str | None]:
    """Every implementation's answer to ``impl=None`` on ``platform``: None (it can run) or why not."""
    return {impl.name: impl.default_reason(*args, platform=platform) for impl in registry}


def explicit_sharding(*arrays: Any) -> str | None:
    """The type of the first operand sharded along an explicit mesh axis (None: none is). Kernels
    (custom calls, Pallas) take unsharded operands; the XLA path partitions like any XLA op."""
    for a in jax.tree.leaves(arrays):
        try:
            spec = jax.typeof(a).sharding.spec
        except (AttributeError, TypeError):
            continue
        if any(s is not None for s in spec):
            return str(jax.typeof(a))
    return None


def custom_call_reason(kind: str, host: str, *operands: Any) -> str | None:
    """Why host-bound custom-call kernels (``kind``: their extension, ISA and runtime are this host's)
    cannot be chosen for ``operands``: traced on another platform than ``host``, an explicitly
    sharded operand (a custom call's result carries no sharding), or several devices (a custom
    call is not partitioned: its operands would be all-gathered)."""
    if host_platform() != host:
        return f"the {kind} are chosen where the program is traced on a {host} host; this one is {host_platform()!r}"
    sharded = explicit_sharding(*operands)
    if sharded is not None:
        return f"the {kind} take unsharded operands; {sharded} is sharded along an explicit mesh axis"
    if jax.device_count() > 1:
        return f"FFI custom calls are not partitioned across the {jax.device_count()} devices"
    return None


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What an op runs for given arguments, and why not every other implementation.

    Attributes:
      op: the op (``"matmul"``).
      what: the arguments, in words.
      platform: the platform this answers for.
      impl: the implementation it runs there (``interpret``: emulated).
      reasons: every implementation's answer, in registry order: None (can run) or why not.
      platforms: the implementation chosen on each lowering platform (the program holds them all).
      backward: the implementation of the backward's main product (matmul: ``dx``), if any.
    """

    op: str
    what: str
    platform: str
    impl: str
    interpret: bool
    reasons: dict[str, str | None]
    platforms: dict[str, str]
    backward: str | None = None

    def __str__(self) -> str:
        head = f"{self.op} {self.what} on {self.platform}: {self.impl}" + (" (emulated)" if self.interpret else "")
        if self.backward is not None:
            head += f"; backward: {self.backward}"
        lines = [head]
        for name, why in self.reasons.items():
            if name != self.impl:
                lines.append(f"  {name}: {'could run (lower in the order)' if why is None else why}")
        lines.append("  per platform: " + ", ".join(f"{p} {i}" for p, i in self.platforms.items()))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One choice per lowering platform (`PLATFORMS`, then ``default`` for any other); hashable."""

    cpu: Any
    cuda: Any
    rocm: Any
    default: Any

    @classmethod
    def everywhere(cls, choice) -> Plan:
        return cls(choice, choice, choice, choice)

    @classmethod
    def build(cls, pick: Callable[[str], Any], default) -> Plan:
        return cls(*(pick(p) for p in PLATFORMS), default=default)

    def of(self, platform: str):
        return getattr(self, platform) if platform in PLATFORMS else self.default

    @property
    def single(self):
        """The choice when every platform has the same one (no platform switch)."""
        return self.cpu if self.cpu == self.cuda == self.rocm == self.default else None


def run(plan: Plan, fn: Callable, *args):
    """``fn(choice, *args)`` with the choice of the platform the program is lowered for.

    ``fn`` must be a module-level function (its traced branches are cached by value) that reads
    only its arguments.
    """
    if plan.single is not None:
        return fn(plan.single, *args)
    calls = {c: functools.partial(fn, c) for c in (plan.cpu, plan.cuda, plan.rocm, plan.default)}
    return _per_platform({p: calls[plan.of(p)] for p in PLATFORMS}, calls[plan.default], *args)
