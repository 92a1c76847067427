"""A script's plain ``torch.distributed.init_process_group`` becomes jitckpt's.

Under ``jitckpt run`` the elastic agent keeps one store for every restart
attempt, so a group built the plain way after a restart reads the previous
attempt's addresses and fails ("Gloo connectFullMesh failed ... Connection
refused", docs/platform.md, "Restarts under torchrun share one store"). A
script that kept its ``dist.init_process_group("gloo")`` would then fail on
every restart. The bootstrap therefore makes that call build the group the
way ``jitckpt.init_process_group`` does (a store prefix per attempt, the
SIGTERM thread first, a detached group for spares): the group is adopted,
and the script needs no change for it.

Only the call that reads the launcher's environment is adopted (no
``store``, ``init_method`` None or ``env://``, no group name): a script that
builds its own store or rendezvous keeps it.

The patch is applied when ``torch.distributed`` has been imported: at once
in a worker forked from the warm pool (torch is already loaded), else by a
one-shot import hook, so this module, which the bootstrap imports before
torch, needs only the standard library.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

TARGET = "torch.distributed"
ADOPTED_MARK = "_jitckpt_adopts"
# Whether an adopted call started transparent mode (the bootstrap says so
# at the end of a script that never made such a call).
transparent_installed = False


def install() -> None:
    """Adopt the plain call from now on in this process."""
    module = sys.modules.get(TARGET)
    if module is not None and hasattr(module, "init_process_group"):
        _patch(module)
        return
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds ``torch.distributed`` through the other finders and patches it
    once it has run; then steps aside."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def adopts(arguments: dict[str, Any]) -> bool:
    """Whether a call with these (bound) arguments reads the launcher's
    environment, the only kind adopted."""
    return (
        arguments.get("store") is None
        and arguments.get("init_method") in (None, "env://")
        and not arguments.get("group_name")
        and not arguments.get("_ranks")
    )


def _patch(module: ModuleType) -> None:
    original: Callable[..., Any] = module.init_process_group
    if getattr(original, ADOPTED_MARK, False):
        return
    signature = inspect.signature(original)

    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs).arguments
        if not adopts(arguments):
            return original(*args, **kwargs)
        from jitckpt import process_exit
        from jitckpt.distributed import init_process_group as jitckpt_init

        extra = {
            name: arguments[name]
            for name in ("pg_options", "device_id")
            if arguments.get(name) is not None
        }
        jitckpt_init(arguments.get("backend"), timeout=arguments.get("timeout"), **extra)
        from jitckpt import protocol

        if os.environ.get(protocol.TRANSPARENT_RUN_DIR_ENV):
            # `jitckpt run --transparent`: the script's objects are followed
            # from here on (its DDP model and loaders need this group).
            from jitckpt.checkpoint import transparent

            transparent.install()
            global transparent_installed
            transparent_installed = True
        # A script that never destroys its group may abort at exit while gloo
        # tears down (docs/platform.md, "A gloo group left at exit can abort
        # the process"): end it before the interpreter does, when that is safe.
        # Once per process, however often the script makes its group.
        atexit.unregister(_destroy_at_exit)
        atexit.register(_destroy_at_exit, module, process_exit.unsafe)

    init_process_group.__wrapped__ = original  # type: ignore[attr-defined]
    init_process_group.__doc__ = original.__doc__
    setattr(init_process_group, ADOPTED_MARK, True)
    module.init_process_group = init_process_group  # type: ignore[attr-defined]
    # Modules that imported the function by name hold their own reference
    # (distributed_c10d defines it; device_mesh calls its copy when a mesh is
    # made before any group): replace every copy of the original.
    for name, other in list(sys.modules.items()):
        if name.startswith(TARGET + ".") and getattr(other, "init_process_group", None) is original:
            other.init_process_group = init_process_group  # type: ignore[attr-defined]


def _destroy_at_exit(module: ModuleType, unsafe: Callable[[], bool]) -> None:
    if unsafe():
        return  # after an abandoned collective, the bootstrap ends the process instead
    try:
        if module.is_initialized():
            module.destroy_process_group()
    except Exception:  # noqa: BLE001 - the script has ended; its exit status stands
        pass
