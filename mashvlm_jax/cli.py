"""The ``mashvlm`` console script: ``mashvlm <command> [--flags]``.

Each command is a module ``mashvlm_jax/commands/<name>.py`` (command ``name`` with
underscores written as dashes: ``import_hf.py`` -> ``mashvlm import-hf``) that defines its
absl flags on import and a ``main(argv)``; the first line of its docstring is its help.
Only the chosen command's module is imported, so flags never collide and ``mashvlm --help``
needs no jax. ``--config=configs/NAME.py[:ARGS]`` with ``--config.KEY=VALUE`` overrides is
the ml_collections ``config_flags`` convention (big_vision, Scenic).
"""
from __future__ import annotations

import ast
import importlib
import pathlib
import sys

COMMANDS_DIR = pathlib.Path(__file__).parent / "commands"
HELP_FLAGS = ("--help", "--helpshort", "--helpfull", "-?")


def commands() -> dict[str, pathlib.Path]:
  """command name -> module file, for every module in mashvlm_jax/commands/."""
  return {p.stem.replace("_", "-"): p for p in sorted(COMMANDS_DIR.glob("*.py"))
          if not p.stem.startswith("_")}


def summary(path: pathlib.Path) -> str:
  doc = ast.get_docstring(ast.parse(path.read_text())) or ""
  return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
  lines = ["usage: mashvlm <command> [--flags]   (mashvlm <command> --help for flags)", "",
           "commands:"]
  lines += [f"  {name:<16} {summary(path)}" for name, path in commands().items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  command = argv[1]
  if command not in commands():
    print(f"mashvlm: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  module = importlib.import_module(f"mashvlm_jax.commands.{command.replace('-', '_')}")
  from absl import app, flags  # imported late: `mashvlm --help` needs no jax
  # absl's --help prints the __main__ module's docstring and the flags of the module it
  # takes for main (sys.argv[0]): show the command's own.
  sys.modules["__main__"].__doc__ = module.__doc__
  # key flags: its own and those it adopts (mashvlm_jax/distributed.py's multi-host flags)
  for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
    flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
  try:
    app.run(_with_resolved_paths(module.main), argv=[f"mashvlm {command}"] + argv[2:])
  except SystemExit as stop:  # absl ends --help, --helpshort and --helpfull with status 1
    if stop.code == 1 and any(a in HELP_FLAGS for a in argv[2:]):
      sys.exit(0)
    raise


def console_logging() -> None:
  """Orbax, JAX and TFDS log every save and file at INFO through absl: keep the console
  for the project's own messages (the ``mashvlm`` logger, INFO) unless --verbosity asks
  for more."""
  import logging
  from absl import flags
  from absl import logging as absl_logging
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  ours = logging.getLogger("mashvlm")
  ours.setLevel(logging.INFO)
  for old in [h for h in ours.handlers if getattr(h, "mashvlm_console", False)]:
    ours.removeHandler(old)  # a second command in one process: one handler, today's stderr
  handler = logging.StreamHandler()
  handler.mashvlm_console = True
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
  ours.addHandler(handler)
  ours.propagate = False


def _with_resolved_paths(command_main):
  """``command_main`` run with the console logging above and after the local paths in
  ``--config`` (init_from, data_dir, ...) are made absolute against the current directory
  (mashvlm_jax/paths.py), once for every command; path flags resolve themselves
  (``paths.DEFINE_path``)."""
  def run(argv):
    from absl import flags
    from mashvlm_jax import paths
    console_logging()
    if "config" in flags.FLAGS:
      paths.resolve_config_paths(flags.FLAGS.config)
    return command_main(argv)
  return run


if __name__ == "__main__":
  main()
