"""Every private torch API jitckpt relies on is still there
(jitckpt.compat). When this fails after a torch upgrade, the message names
what broke: adapt that function of jitckpt.compat, nothing else."""

from __future__ import annotations

from jitckpt import compat


def test_every_private_torch_api_jitckpt_uses_exists() -> None:
    problems = compat.check()
    assert problems == [], "torch changed under jitckpt.compat: " + "; ".join(problems)


def test_the_check_would_name_a_missing_member(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monkeypatch.delattr(LocalElasticAgent, "_monitor_workers")
    problems = compat.check()
    assert any("_monitor_workers" in p for p in problems), problems


def test_the_check_would_name_a_missing_module_function(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed.launcher.api as api

    monkeypatch.delattr(api, "_get_addr_and_port")
    assert "launcher.api._get_addr_and_port" in compat.check()


def test_the_standalone_stores_listen_on_loopback_only() -> None:
    """Both TCPStore servers of a `--standalone` rendezvous (the backend's
    and the one shared with the workers) are bound to 127.0.0.1, where
    torch's own listen on every interface."""
    import os

    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from jitckpt.testing.sockets import listening

    before = listening(os.getpid())
    params = RendezvousParameters(
        backend="c10d", endpoint="127.0.0.1:0", run_id="loopback", min_nodes=1, max_nodes=1
    )
    handler = compat.loopback_rendezvous(params)
    shared = handler._create_tcp_store_server("0.0.0.0", 0)
    opened = listening(os.getpid()) - before
    print(f"stores listen on {sorted(opened)}")
    assert len(opened) == 2 and {address for address, _port in opened} == {"127.0.0.1"}
    assert shared.port in {port for _address, port in opened}
    shared.set("k", "v")
    assert shared.get("k") == b"v"
