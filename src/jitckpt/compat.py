"""Every private or undocumented torch API jitckpt relies on, in one place.

jitckpt builds on torch.distributed.elastic (the launcher) and DDP (the
worker) through their public interfaces where they have one. Where they do
not, the access is wrapped here, so that a torch upgrade that renames or
removes one breaks this module only, and :func:`check` (run by
tests/unit/test_compat.py) names what broke instead of a launch failing
obscurely. Imports are lazy: the worker side never imports the elastic
agent, and nothing here runs at import time.

Launcher side (torch.distributed.elastic, jitckpt.launch):

* ``torch.distributed.launcher.api._get_addr_and_port``: the master address
  torchrun derives from the rendezvous parameters.
* ``local_elastic_agent.start_processes``: the one call LocalElasticAgent
  makes to start all local workers; in-process recovery diverts it to start
  one process context per worker.
* ``SimpleElasticAgent``'s protected template methods and state that
  JitAgent overrides or reads (``_start_workers``, ``_stop_workers``,
  ``_monitor_workers``, ``_restart_workers``, ``_shutdown``, ``_pcontext``,
  ``_remaining_restarts``); ``_shutdown(timeout=...)`` is newer than 2.11.
* the c10d rendezvous handler's round (``_state_holder.state.round``), and
  its ``_create_tcp_store_server`` (the TCPStore shared with the workers),
  replaced for ``--standalone`` by one listening on loopback only
  (:func:`loopback_rendezvous`).
* a process context's ``subprocess_handlers`` (each worker's Popen).
* ``DefaultLogsSpecs``'s ``_redirects`` and ``_tee``.
* ``LaunchConfig.shutdown_timeout`` (newer than torch 2.6).

Worker side (DDP, DCP):

* ``DistributedDataParallel.reducer._update_process_group``: points a
  survivor's reducer at another group after an in-process recovery.
* ``DistributedDataParallel._register_buffer_comm_hook`` (with
  ``_BufferCommHookLocation.PRE_FORWARD``): DDP's forward-time buffer
  broadcast through a hook that a recovery can wake.
* ``torch.distributed.checkpoint._nested_dict.flatten_state_dict``: DCP's
  own key flattening, so digests key tensors exactly as DCP does.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

# The members of SimpleElasticAgent that JitAgent overrides or calls.
AGENT_METHODS = (
    "_start_workers",
    "_stop_workers",
    "_monitor_workers",
    "_restart_workers",
    "_shutdown",
)
# Instance attributes of SimpleElasticAgent / LocalElasticAgent JitAgent reads.
AGENT_ATTRIBUTES = ("_pcontext", "_remaining_restarts")


# -- launcher side -------------------------------------------------------------------
def addr_and_port(rdzv_parameters: Any) -> tuple[str | None, int | None]:
    from torch.distributed.launcher.api import _get_addr_and_port

    return _get_addr_and_port(rdzv_parameters)  # type: ignore[no-any-return]


def loopback_store(timeout_s: float = 60.0) -> Any:
    """A TCPStore server that listens on 127.0.0.1 only. TCPStore binds its
    server to every interface and has no bind address; it takes a socket
    the caller bound instead (``master_listen_fd``), and owns it after."""
    import datetime
    import socket

    import torch.distributed as dist

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(socket.SOMAXCONN)
        port = listener.getsockname()[1]
    except OSError:
        listener.close()
        raise
    return dist.TCPStore(
        "127.0.0.1",
        port,
        is_master=True,
        multi_tenant=True,
        timeout=datetime.timedelta(seconds=timeout_s),
        master_listen_fd=listener.detach(),
    )


def loopback_rendezvous(rdzv_parameters: Any) -> Any:
    """The c10d rendezvous handler of a one-node job whose two TCPStore
    servers (the rendezvous backend's, and the one shared with the workers)
    listen on 127.0.0.1 only: torch's own listen on every interface, where
    anyone who reaches the host could write the control keys or the
    pickles the rendezvous reads."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    timeout_s = float(rdzv_parameters.get_as_int("read_timeout", 60) or 60)
    store = loopback_store(timeout_s)
    backend = C10dRendezvousBackend(store, rdzv_parameters.run_id)
    handler = create_handler(store, backend, rdzv_parameters)
    # Its own would listen on every interface (called on rank 0, per round).
    setattr(handler, "_create_tcp_store_server", lambda _addr, _port: loopback_store())  # noqa: B010
    return handler


@contextlib.contextmanager
def divert_start_processes(start: Callable[..., Any]) -> Iterator[None]:
    """While active, LocalElasticAgent starts its workers with ``start``
    (same keyword arguments as elastic's ``start_processes``)."""
    from unittest import mock

    from torch.distributed.elastic.agent.server import local_elastic_agent

    with mock.patch.object(local_elastic_agent, "start_processes", start):
        yield


def rendezvous_round(rdzv_handler: Any) -> object:
    """The c10d rendezvous round (changes with every membership change), or
    "na" for a handler without one."""
    state = getattr(getattr(rdzv_handler, "_state_holder", None), "state", None)
    return getattr(state, "round", "na")


def subprocess_handlers(pcontext: Any) -> dict[Any, Any]:
    """A process context's handlers by local rank (each with ``.proc``, a
    Popen); empty for a context that has none."""
    return dict(getattr(pcontext, "subprocess_handlers", {}))


def logs_spec_streams(logs_specs: Any) -> tuple[Any, Any]:
    """The ``redirects`` and ``tee`` a DefaultLogsSpecs was built with."""
    return logs_specs._redirects, logs_specs._tee


def shutdown_takes_timeout(agent: Any) -> bool:
    return "timeout" in inspect.signature(agent._shutdown).parameters


def agent_config_extras(config: Any) -> dict[str, Any]:
    """Keyword arguments of LocalElasticAgent that older torch lacks."""
    return (
        {"shutdown_timeout": config.shutdown_timeout} if hasattr(config, "shutdown_timeout") else {}
    )


# -- worker side ----------------------------------------------------------------------
def repoint_reducer(ddp: Any, group: Any) -> None:
    """Point a DDP model's reducer at ``group`` (its only remaining use of a
    group is the bucket-rebuild broadcast)."""
    ddp.reducer._update_process_group(group)


def register_buffer_hook(ddp: Any, hook: Callable[[Any, dict[str, Any]], Any]) -> None:
    """Make ``hook(state, named_buffers)`` DDP's buffer sync at the start of
    every forward, in place of its broadcast from rank 0."""
    from torch.nn.parallel.distributed import _BufferCommHookLocation

    ddp._register_buffer_comm_hook(
        None, hook, comm_hook_location=_BufferCommHookLocation.PRE_FORWARD
    )


def flatten_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict as flatten

    flat, _mapping = flatten(state)
    return flat  # type: ignore[no-any-return]


# -- the check --------------------------------------------------------------------------
def check() -> list[str]:
    """What of the above this torch lacks (empty when all is there)."""
    problems: list[str] = []

    def need(ok: Callable[[], bool], what: str) -> None:
        try:
            if not ok():
                problems.append(what)
        except Exception as exc:  # noqa: BLE001 - an import error is the answer
            problems.append(f"{what} ({type(exc).__name__}: {exc})")

    def has(module: str, name: str) -> bool:
        import importlib

        return hasattr(importlib.import_module(module), name)

    need(
        lambda: has("torch.distributed.launcher.api", "_get_addr_and_port"),
        "launcher.api._get_addr_and_port",
    )
    need(
        lambda: has(
            "torch.distributed.elastic.agent.server.local_elastic_agent", "start_processes"
        ),
        "local_elastic_agent.start_processes",
    )
    need(
        lambda: has("torch.distributed.run", "get_args_parser"),
        "torch.distributed.run.get_args_parser",
    )
    need(
        lambda: has("torch.distributed.run", "config_from_args"),
        "torch.distributed.run.config_from_args",
    )

    def agent_members() -> bool:
        from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

        # Concrete: SimpleElasticAgent declares some of them abstract.
        missing = [
            m
            for m in AGENT_METHODS
            if not callable(method := getattr(LocalElasticAgent, m, None))
            or getattr(method, "__isabstractmethod__", False)
        ]
        source = inspect.getsource(LocalElasticAgent) + "".join(
            inspect.getsource(base) for base in LocalElasticAgent.__mro__[1:3]
        )
        missing += [a for a in AGENT_ATTRIBUTES if f"self.{a}" not in source]
        if missing:
            problems.append(f"SimpleElasticAgent lacks {missing}")
        return True

    need(agent_members, "SimpleElasticAgent members")

    def logs_spec() -> bool:
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs

        spec = DefaultLogsSpecs()
        return (
            hasattr(spec, "_redirects") and hasattr(spec, "_tee") and hasattr(spec, "root_log_dir")
        )

    need(logs_spec, "DefaultLogsSpecs._redirects/_tee/root_log_dir")

    def rendezvous_state() -> bool:
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous

        source = inspect.getsource(dynamic_rendezvous)
        return "_state_holder" in source and "round" in source

    need(rendezvous_state, "DynamicRendezvousHandler._state_holder.state.round")

    def store_server() -> bool:
        import torch.distributed as dist
        from torch.distributed.elastic.rendezvous import dynamic_rendezvous

        handler = dynamic_rendezvous.DynamicRendezvousHandler
        return (
            callable(getattr(handler, "_create_tcp_store_server", None))
            and hasattr(dynamic_rendezvous, "create_handler")
            and "master_listen_fd" in (dist.TCPStore.__init__.__doc__ or "")
        )

    need(
        store_server, "DynamicRendezvousHandler._create_tcp_store_server, TCPStore master_listen_fd"
    )

    def handlers() -> bool:
        from torch.distributed.elastic.multiprocessing import api

        return "self.subprocess_handlers" in inspect.getsource(api.SubprocessContext)

    need(handlers, "SubprocessContext.subprocess_handlers")

    def reducer() -> bool:
        import torch

        return hasattr(torch._C._distributed_c10d.Reducer, "_update_process_group")

    need(reducer, "DDP Reducer._update_process_group")

    def buffer_hook() -> bool:
        from torch.nn.parallel import distributed as ddp

        return hasattr(ddp.DistributedDataParallel, "_register_buffer_comm_hook") and hasattr(
            ddp._BufferCommHookLocation, "PRE_FORWARD"
        )

    need(buffer_hook, "DistributedDataParallel._register_buffer_comm_hook (PRE_FORWARD)")
    need(
        lambda: has("torch.distributed.checkpoint._nested_dict", "flatten_state_dict"),
        "torch.distributed.checkpoint._nested_dict.flatten_state_dict",
    )
    return problems
