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
