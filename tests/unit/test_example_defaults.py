"""The example scripts' command lines (issue 22 item 8): the second-order options default to the package's own
defaults unless their help says why not (naming the package's value), and no help text says "(default: ...)" twice
(a hand-written default plus the one ``ArgumentDefaultsHelpFormatter`` appends)."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import pytest

import kfac
from kfac.optimizer import DEFAULTS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def _signature_defaults(cls: type) -> dict[str, Any]:
    return {k: v.default for k, v in inspect.signature(cls).parameters.items()
            if v.default is not inspect.Parameter.empty}


# What kfac.KFAC / kfac.EKFAC / kfac.MFAC use when an option is not passed, read here independently of the examples.
KFAC_DEFAULTS = {**_signature_defaults(kfac.KFACPreconditioner), **DEFAULTS}
MFAC_DEFAULTS = _signature_defaults(kfac.MFACPreconditioner)


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parser(path: Path, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser | None:
    """The parser ``path`` builds: its ``main([])`` (or ``main()``) is stopped at ``parse_args``."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    def stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    main = getattr(module, "main", None)
    if main is None:
        return None
    try:
        main([]) if inspect.signature(main).parameters else main()
    except _Parsed as parsed:
        return parsed.parser
    return None


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text of ``action`` as ``--help`` prints it (defaults expanded, on one line)."""
    if not action.help:
        return ""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def _value(v: Any) -> str:
    return "off" if v is None else f"{v:g}"


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_no_help_says_default_twice(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = _parser(path, monkeypatch)
    if parser is None:
        pytest.skip(f"{path.name} builds no argparse parser")
    twice = {a.option_strings[0] if a.option_strings else a.dest: text for a in parser._actions
             if (text := _help(parser, a)).count("(default") > 1}
    assert not twice, twice


TRAINING = [p for p in SCRIPTS if p.name in ("torch_cifar10_resnet.py", "torch_imagenet_resnet.py")]


@pytest.mark.parametrize("path", TRAINING, ids=[p.name for p in TRAINING])
def test_second_order_defaults_are_the_packages_or_say_why(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = _parser(path, monkeypatch)
    assert parser is not None
    actions = {a.dest: a for a in parser._actions}

    def effective(dest: str, fallback: str) -> Any:  # --damping None: the optimizer's own default of the script
        default = actions[dest].default
        return parser.get_default(fallback) if default is None else default

    checks = [(f"K-FAC {d}", d, actions[d].default, KFAC_DEFAULTS[d])
              for d in ("factor_update_steps", "inv_update_steps", "factor_decay", "kl_clip")]
    checks += [("K-FAC damping", "damping", effective("damping", "kfac_damping"), KFAC_DEFAULTS["damping"]),
               ("M-FAC damping", "damping", effective("damping", "mfac_damping"), MFAC_DEFAULTS["damping"]),
               ("M-FAC num_grads", "num_grads", actions["num_grads"].default, MFAC_DEFAULTS["num_grads"]),
               ("M-FAC kl_clip", "kl_clip", actions["kl_clip"].default, MFAC_DEFAULTS["kl_clip"])]
    unexplained = []
    for what, dest, ours, package in checks:
        if ours is None:
            unexplained.append(f"{what}: the parser states no default (the package's {package!r})")
            continue
        if ours == package:
            continue
        text = _help(parser, actions[dest])
        if not re.search(rf"package(?:'s)? default is {re.escape(_value(package))}(?![\d.e])", text):
            unexplained.append(f"{what}: {ours!r}, the package's {package!r}; help: {text!r}")
    assert not unexplained, "\n".join(unexplained)
