"""The generated reference pages leave nothing out: every option of every command (every bench kind's too), every
engine setting, every graph key and every operator parameter is on its page with words that explain it. A new flag
without `help=`, a setting without `metadata={"help": ...}` or an operator parameter missing from its class's
`parameter_help` fails here, naming it.

Two kinds of argparse action are not listed, on purpose: `-h/--help`, which every command has (the page says so
once), and an action whose help is `argparse.SUPPRESS`, which its command hides from `--help` as plumbing no user
types; the page hides it the same way."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sagellm.cli.main import build_parser
from sagellm.cli.reference import PAGES, cli_reference, configuration_reference, openai_reference, rendered
from sagellm.cli.reference.configuration import ENGINE_HEADING
from sagellm.cli.reference.graph_files import KEY_HELP, NESTED, NODE_KEY_HELP, engine_operators, graph_operators
from sagellm.cli.reference.markdown import NONE, anchor, code
from sagellm.cli.reference.openai_api import body_fields
from sagellm.gateway.http.app import App
from sagellm.gateway.openai import field_help as openai_help
from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest
from sagellm.gateway.openai.completion.protocol import CompletionRequest
from sagellm.gateway.openai.embedding.protocol import EmbeddingRequest
from sagellm.gateway.openai.tokenization.protocol import DetokenizeRequest, TokenizeRequest
from sagellm.gateway.openapi import BODIES, field_help, openapi_document
from sagellm.runtime.engine.config import ENGINE_FIELDS
from sagellm.runtime.pipeline.operator import list_operators
from sagellm.runtime.pipeline.yaml_io import NODE_KEYS, TOP_KEYS

ROOT = Path(__file__).resolve().parents[2]


def _sections(markdown: str) -> dict[str, str]:
    """Heading text (code spans unwrapped) -> the Markdown under it, down to the next heading."""
    sections: dict[str, str] = {}
    heading = ""
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().replace("`", "")
            sections[heading] = ""
        else:
            sections[heading] = sections.get(heading, "") + line + "\n"
    return sections


def _row(section: str, first_cell: str) -> list[str] | None:
    """The cells of the table row whose first cell starts with `first_cell`."""
    for line in section.splitlines():
        if line.startswith(f"| {first_cell}"):
            return [c.strip() for c in line.strip("|").split(" | ")]
    return None


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, walked here on its own: the top build, then each bench kind from a build naming it."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser) -> None:
        found[parser.prog] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)

    walk(build_parser([]))
    for kind in [c for c in found if c.startswith("sagellm bench ")]:
        built = build_parser(kind.split()[1:])
        bench = next(a for a in built._subparsers._group_actions if "bench" in a.choices).choices["bench"]
        walk(bench._subparsers._group_actions[0].choices[kind.split()[-1]])
    return found


CLI = _sections(cli_reference())
CONFIG = _sections(configuration_reference())
OPENAI = openai_reference()
PARSERS = _parsers()


def test_bench_kinds_bring_their_options() -> None:
    """The page is built from parsers that hold each bench kind's options, which `sagellm --help` never loads."""
    assert len(PARSERS["sagellm bench serve"]._actions) > 5
    assert "--base-url" in CLI["sagellm bench serve"]


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_argument_of_every_command_is_listed_with_help(command: str) -> None:
    assert command in CLI, f"no section for `{command}`"
    missing = []
    for action in PARSERS[command]._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        name = code(action.option_strings[0]) if action.option_strings else code(action.metavar or action.dest)
        row = _row(CLI[command], name)
        if row is None or not row[-1] or row[-1] == NONE:
            missing.append(f"{command} {'/'.join(action.option_strings) or action.dest}: " + (
                "not listed" if row is None else "no help= text"))  # fmt: skip
    assert missing == []


@pytest.mark.parametrize("command", sorted(c for c in PARSERS if PARSERS[c]._subparsers))
def test_subcommands_are_listed_and_linked(command: str) -> None:
    for sub in [c for c in PARSERS if c.startswith(command + " ") and len(c.split()) == len(command.split()) + 1]:
        assert f"[`{sub}`](#{anchor(sub)})" in CLI[command]


@pytest.mark.parametrize("name", list(ENGINE_FIELDS))
def test_every_engine_setting_is_listed_with_help_and_flag(name: str) -> None:
    row = _row(CONFIG[ENGINE_HEADING], code(name))
    assert row is not None, f"engine setting {name} is not listed"
    setting, _type, _default, flag, help_ = row
    assert help_ not in ("", NONE) and ENGINE_FIELDS[name][2], f"engine setting {name} has no help"
    if name != "model":  # each command names its model its own way
        assert code("--" + name.replace("_", "-")) in flag


def test_graph_keys_have_meanings_one_for_one() -> None:
    """KEY_HELP is the one table of words the code lacks: it must match the reader's keys exactly."""
    assert list(KEY_HELP) == list(TOP_KEYS)
    assert list(NODE_KEY_HELP) == list(NODE_KEYS)
    for key in TOP_KEYS:
        assert _row(CONFIG["Graph files"], code(key)) is not None
    for key in NODE_KEYS:
        assert _row(CONFIG["Node keys"], code(key)) is not None
    for key, struct in NESTED.items():
        for field in struct.__dataclass_fields__:
            assert _row(CONFIG[f"{key} keys"], code(field)) is not None


def test_every_builtin_operator_is_a_graph_operator() -> None:
    builtin = {n for n, cls in list_operators().items() if cls.__module__.startswith("sagellm.operators.")}
    assert builtin <= set(graph_operators())
    assert "instant_engine" not in CONFIG  # a benchmark's fixture


@pytest.mark.parametrize("op", sorted(graph_operators()))
def test_every_operator_parameter_is_listed_with_a_description(op: str) -> None:
    assert op in CONFIG, f"operator {op} has no section"
    cls, missing = graph_operators()[op], []
    for pname in cls.parameters():
        if op in engine_operators() and pname in ENGINE_FIELDS:
            continue  # the engine settings' table has them, checked above
        row = _row(CONFIG[op], code(pname))
        if row is None or row[-1] in ("", NONE):
            missing.append(f"{op}.{pname}: add it to {cls.__name__}.parameter_help")
    assert missing == []


def test_anchors_are_mkdocs_own() -> None:
    slugify = pytest.importorskip("markdown.extensions.toc").slugify
    for heading in [*CLI, *CONFIG]:
        assert anchor(heading) == slugify(heading, "-")
    assert anchor("`sagellm serve`") == "sagellm-serve" and anchor("`sagellm run`") == "sagellm-run"


@pytest.mark.parametrize("page", list(PAGES))
def test_the_committed_page_is_what_the_code_generates(page: str) -> None:
    committed = (ROOT / "docs" / page).read_text()
    assert committed == rendered(page, committed), (
        f"docs/{page} is stale: run `.venv/bin/python -m sagellm.cli.reference` and commit the page"
    )


def test_rendering_keeps_the_introduction_and_replaces_what_follows_the_marker() -> None:
    marker, _ = PAGES["reference/cli.md"]
    page = rendered("reference/cli.md", f"# Intro\n\nwords\n\n{marker}\n\nan old table\n")
    assert page.startswith(f"# Intro\n\nwords\n\n{marker}\n\n") and "an old table" not in page
    assert "## `sagellm serve`" in page
    config = rendered("reference/configuration.md", f"# C\n{PAGES['reference/configuration.md'][0]}\n")
    assert f"## {ENGINE_HEADING}" in config
    with pytest.raises(ValueError, match="no <!-- sagellm:cli-reference --> line"):
        rendered("reference/cli.md", "# no marker\n")


@pytest.mark.slow
def test_pages_are_the_same_in_a_fresh_process() -> None:
    """Deterministic: the same Markdown whatever ran before (here the configuration page first, in a new process)."""
    script = "from sagellm.cli.reference import *; print(configuration_reference() + cli_reference(), end='')"
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert fresh.stdout == configuration_reference() + cli_reference()


@pytest.mark.parametrize("route", list(BODIES))
def test_every_request_field_has_words_on_the_page(route: str) -> None:
    body = BODIES[route]
    section = _sections(OPENAI)[route]  # headings lose their backticks
    missing = [f.name for f in body_fields(body) if field_help(body, f.name) is None]
    assert missing == [], f"{body.__name__}: add {missing} to its API's field_help.py"
    for field in body_fields(body):
        assert _row(section, code(field.name)) is not None, f"{route}: {field.name} is not on the page"


def test_openapi_properties_carry_the_same_words() -> None:
    document = openapi_document(App(), "test")
    for body in (CompletionRequest, ChatCompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest):
        properties = document["components"]["schemas"][body.__name__]["properties"]
        assert {name: p.get("description") for name, p in properties.items()} == {
            f.name: openai_help.field_help(body.__name__, f.name) for f in body_fields(body)
        }
