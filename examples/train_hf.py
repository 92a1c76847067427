"""A tiny GPT-2 trained with the Hugging Face Trainer on synthetic tokens,
with jitckpt: the one line marked "# jitckpt" (and its import) is the whole
integration. The resume line is the Trainer's own usual one.

    jitckpt run --standalone --nproc-per-node 2 examples/train_hf.py --output-dir runs/hf

The model is built from a config (no download); each sequence is a pure
function of its index. --digest writes the SHA-256 of the final weights
(rank 0), --steps the Trainer's max_steps.
"""

import argparse
import hashlib
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from jitckpt.integrations.huggingface import JitCheckpointCallback  # jitckpt


class SyntheticTokens(torch.utils.data.Dataset):
    """Sequences of 32 tokens over a vocabulary of 256: a repeating pattern
    with noise, learnable in a few dozen steps."""

    def __init__(self, size: int, seq: int = 32) -> None:
        self.size, self.seq = size, seq

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(index)
        start = int(torch.randint(0, 256, (1,), generator=gen))
        tokens = (start + torch.arange(self.seq) * (index % 7 + 1)) % 256
        noise = torch.rand(self.seq, generator=gen) < 0.1
        tokens = torch.where(noise, torch.randint(0, 256, (self.seq,), generator=gen), tokens)
        return {"input_ids": tokens, "labels": tokens.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/hf")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--digest", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        vocab_size=256,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=SyntheticTokens(args.samples),
        callbacks=[JitCheckpointCallback()],  # jitckpt
    )
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=last)
    if args.digest and trainer.is_world_process_zero():
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
        with open(args.digest, "w") as handle:
            handle.write(digest.hexdigest() + "\n")


if __name__ == "__main__":
    main()
