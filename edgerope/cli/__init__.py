"""The ``edgerope`` command line: a thin click layer over the library.

Commands live one per module in this package and are imported only when run,
so ``edgerope --help`` stays instant and never imports torch or llama_cpp.
"""

from __future__ import annotations

import importlib

import click

from edgerope import __version__

# command name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "convert": ("edgerope.cli.convert", "convert", "Convert a Hugging Face checkpoint to GGUF, rope metadata exact."),
    "quantize": ("edgerope.cli.quantize", "quantize", "Quantize a GGUF with llama.cpp's own quantizer."),
    "inspect": ("edgerope.cli.inspect", "inspect", "Show what llama.cpp will compute from a GGUF, and lint it."),
    "set-rope": ("edgerope.cli.set_rope", "set_rope", "Rewrite the rope scaling metadata of an existing GGUF."),
    "demo": ("edgerope.cli.demo", "demo", "Stretch the built-in tiny model from 256 to 2048 tokens: table, plot, Q&A."),
    "ask": ("edgerope.cli.ask", "ask", "Answer a question about a long document; its KV state is cached on disk."),
    "eval": ("edgerope.cli.eval", "eval_", "Passkey, multi-key or perplexity on a checkpoint or GGUF; table and plot."),
    "finetune": ("edgerope.cli.finetune", "finetune", "Fine-tune a checkpoint at a scaled rope (full or PoSE)."),
    "pretrain": ("edgerope.cli.pretrain", "pretrain", "Rebuild the built-in tiny model from its recipe."),
    "plan": ("edgerope.cli.plan", "plan", "Plan the memory llama.cpp needs for a GGUF; the largest context that fits."),
    "serve": ("edgerope.cli.serve", "serve", "Serve a GGUF over an OpenAI-compatible HTTP API on 127.0.0.1."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgerope")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """edgerope: long-context models from PyTorch to llama.cpp with exact rope scaling."""
    import logging

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    """The console script: the command runs in a child process so that a native crash is reported, not a bare
    signal (``edgerope.cli.guard``)."""
    import sys

    from edgerope.cli import guard

    argv = sys.argv[1:]
    if guard.should_guard(argv):
        sys.exit(guard.run_guarded(argv))
    guard.enable_in_child()
    cli(prog_name="edgerope")
