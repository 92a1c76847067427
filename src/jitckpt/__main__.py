from jitckpt.cli import console

console()
