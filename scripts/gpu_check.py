"""The CUDA/NCCL path, checked on a machine with one GPU (not part of CI).

    python scripts/gpu_check.py [--out DIR]

1. State capture while the compute stream is blocked (jitckpt.checkpoint.gpu), in one
   process: a spin kernel (torch.cuda._sleep) stands for a collective that
   never completes.
   a. blocked after the optimizer update of step 3 (a collective placed
      after optimizer.step()): the save must hold step 4 (the update ran);
   b. blocked before the optimizer update of step 3 (the gradient
      all-reduce is stuck): the save must hold step 3, bitwise the state
      copied at boundary 3 before the block.
   Each save must finish while the stream is still blocked; both copy modes
   (pinned and pageable host memory) are tried.
2. `jitckpt run` with NCCL, 1 rank, examples/train_gpt.py --device cuda
   --deterministic: a run with `raise@step=6,rank=0` resumes at step 6 and
   ends with the digest of the failure-free run.

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
BLOCK_S = 8.0
results: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str) -> None:
    results.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def block_stream(seconds: float) -> None:
    """Occupy the current stream with a spin kernel for about ``seconds``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    cycles_per_ms = 1_000_000 / max(start.elapsed_time(end), 1e-3)
    torch.cuda._sleep(int(cycles_per_ms * seconds * 1000))


def host_copy(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    torch.cuda.synchronize()
    out = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"opt.{index}.{key}"] = value.detach().cpu().clone()
    return out


def saved_tensors(path: Path) -> tuple[int, dict[str, torch.Tensor]]:
    from jitckpt.state.training import decode
    from jitckpt.storage.directory import DirectoryStorage

    storage = DirectoryStorage(path.parent)
    candidate = storage.find(path.name)
    assert candidate is not None
    payload = decode(storage.read_verified(candidate), str(path))
    out = {f"model.{k}": v for k, v in payload["model"].items()}
    for index, state in payload["optimizer"]["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"opt.{index}.{key}"] = value
    return int(payload["step"]), out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def capture_while_blocked(where: str, mode: str, workdir: Path) -> None:
    import jitckpt
    from jitckpt.checkpoint.gpu import COPY_MODE_ENV

    os.environ[COPY_MODE_ENV] = mode

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
    ).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = jitckpt.JitCheckpoint(workdir / f"{where}-{mode}", model, optimizer, hang_timeout_s=120)
    reference: dict[str, torch.Tensor] = {}
    path = None
    save_s = blocked_for = blocked_at = 0.0
    for step in ckpt.steps(6):
        if step == 3:
            reference = host_copy(model, optimizer)  # the state at boundary 3
        if step == 4:
            started = time.monotonic()
            path = ckpt.save("manual")
            save_s = time.monotonic() - started
            blocked_for = time.monotonic() - blocked_at
            torch.cuda.synchronize()  # let the block end
            expected_step = 4 if where == "after-update" else 3
            expected = host_copy(model, optimizer) if where == "after-update" else reference
            if path is None:
                check(f"capture {where} ({mode})", False, "save returned None (skipped)")
                return
            saved_step, saved = saved_tensors(path)
            check(
                f"capture {where} ({mode})",
                saved_step == expected_step and same(saved, expected) and save_s < BLOCK_S / 2,
                f"saved step {saved_step} (expected {expected_step}), tensors equal: "
                f"{same(saved, expected)}, save took {save_s:.3f} s while the stream stayed "
                f"blocked ({blocked_for:.2f} s since the block of ~{BLOCK_S} s began)",
            )
            return
        loss = model(torch.randn(64, 256, device="cuda")).square().mean()
        optimizer.zero_grad()
        loss.backward()
        if step == 3 and where == "before-update":
            blocked_at = time.monotonic()
            block_stream(BLOCK_S)
        optimizer.step()
        if step == 3 and where == "after-update":
            blocked_at = time.monotonic()
            block_stream(BLOCK_S)


def nccl_run(workdir: Path) -> None:
    def run(name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        digest = workdir / f"{name}.digest"
        cmd = [
            sys.executable, "-m", "jitckpt", "run", "--standalone", "--nproc-per-node", "1",
            *extra, str(REPO / "examples" / "train_gpt.py"), "--device", "cuda",
            "--deterministic", "--steps", "12", "--log-every", "4",
            "--run-dir", str(workdir / name), "--digest", str(digest),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        return done, digest

    reference, ref_digest = run("reference")
    check(
        "nccl reference run",
        reference.returncode == 0 and ref_digest.exists(),
        f"exit {reference.returncode}"
        + (
            "" if reference.returncode == 0 else reference.stdout[-3000:] + reference.stderr[-3000:]
        ),
    )
    failed, digest = run("failure", "--inject", "raise@step=6,rank=0,phase=forward")
    resumed = [line for line in failed.stdout.splitlines() if line.startswith("jitckpt: resumed")]
    equal = digest.exists() and ref_digest.exists() and digest.read_text() == ref_digest.read_text()
    check(
        "nccl raise, JIT save from the GPU, resume",
        failed.returncode == 0 and any("step 6" in line for line in resumed) and equal,
        f"exit {failed.returncode}, {resumed}, digest equal to the failure-free run: {equal}"
        + ("" if failed.returncode == 0 else failed.stdout[-3000:] + failed.stderr[-3000:]),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="keep run directories here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here", flush=True)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="jitckpt-gpu-", dir=args.out))  # fresh every time
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    for mode in ("pinned", "pageable"):
        for where in ("after-update", "before-update"):
            try:
                capture_while_blocked(where, mode, workdir)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next check
                check(f"capture {where} ({mode})", False, f"{type(exc).__name__}: {exc}")
            torch.cuda.synchronize()
    os.environ.pop("JITCKPT_GPU_COPY", None)
    nccl_run(workdir)
    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
