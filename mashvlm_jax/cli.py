"""The ``mashvlm`` console script: ``mashvlm <command> [--flags]``.

Each command lives in its own module, which defines its absl flags on import and a
``main(argv)``; only the chosen command's module is imported, so flags never collide and
start-up stays fast. ``--config=configs/NAME.py[:ARGS]`` with ``--config.KEY=VALUE``
overrides is the ml_collections ``config_flags`` convention (big_vision, Scenic).
"""
from __future__ import annotations

import importlib
import sys

# command -> (module defining flags and main(argv), one-line help)
COMMANDS = {
    "info": ("mashvlm_jax.commands.info",
             "print a config's sequence layout and parameter counts; --forward runs a "
             "jitted forward and gradient on random frames"),
}


def usage() -> str:
  lines = ["usage: mashvlm <command> [--flags]   (mashvlm <command> --help for flags)", "",
           "commands:"]
  lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"mashvlm: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(COMMANDS[command][0])
  from absl import app  # imported late: `mashvlm --help` needs no jax
  app.run(module.main, argv=[f"mashvlm {command}"] + argv[2:])


if __name__ == "__main__":
  main()
