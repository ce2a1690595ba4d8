"""Write the reference tables in docs/ from their one source: the request schemas (schemas/)
and the environment (worker/settings.py's ``Settings``).

    .venv/bin/python tools/docs_tables.py           # rewrite the tables in place
    .venv/bin/python tools/docs_tables.py --check   # exit 1 if a page is out of date

A table sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->`` in its page;
tests/test_docs.py fails when a page differs from what this writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402


def _type(annotation) -> str:
    """A field's type as a caller writes it in JSON."""
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"\b[\w.]+\.(\w+)", r"\1", text)  # module paths off
    for python, json_name in (("str", "string"), ("int", "integer"), ("float", "number"), ("bool", "boolean"),
                              ("NoneType", "null"), ("SecretStr", "string"), ("Path", "path")):
        text = re.sub(rf"\b{python}\b", json_name, text)
    text = _unannotated(text)
    text = re.sub(r"\b(\w+)Spec\b", "object", text)
    text = re.sub(r"^Optional\[(.*)\]$", r"\1", text)
    text = re.sub(r"Literal\[([^\]]*)\]", _choices, text)
    return text.replace(" | null", "").replace(" | None", "").replace("|", "\\|")


def _unannotated(text: str) -> str:
    """``Annotated[X, constraints...]`` as ``X``."""
    while (start := text.find("Annotated[")) >= 0:
        depth, i = 0, start + len("Annotated")
        inner_end = None
        for i in range(start + len("Annotated"), len(text)):
            if text[i] in "[(":
                depth += 1
            elif text[i] in "])":
                depth -= 1
                if depth == 0:
                    break
            elif text[i] == "," and depth == 1 and inner_end is None:
                inner_end = i
        text = text[:start] + text[start + len("Annotated["):inner_end or i] + text[i + 1:]
    return text


def _choices(match: re.Match) -> str:
    values = [value.strip().strip("'") for value in match.group(1).split(",")]
    return " / ".join(f"`{value}`" for value in values)


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, list):
            return "`[]`"
        return "`{}`" if isinstance(value, (dict, BaseModel)) else "(see meaning)"
    if info.default is PydanticUndefined:
        return "required"
    if info.default is None:
        return ""
    value = info.default
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def fields_table(model: type[BaseModel], prefix: str = "") -> str:
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in model.model_fields.items():
        name = info.alias or name
        rows.append(f"| `{prefix}{name}` | {_type(info.annotation)} | {_default(info)} | {_cell(info.description)} |")
    return "\n".join(rows) + "\n"


def settings_table() -> str:
    from worker.settings import Settings

    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        names = list(alias.choices) if alias is not None else [name.upper()]
        shown = " / ".join(f"`{n}`" for n in names)
        rows.append(f"| {shown} | {_default(info)} | {_cell(info.description)} |")
    return "\n".join(rows) + "\n"


def nested_tables() -> str:
    import schemas as s

    parts = []
    for title, model, prefix in (
        ("`model`", s.ModelSpec, "model."), ("`output`", s.OutputSpec, "output."), ("`loras[i]`", s.LoraSpec, ""),
        ("`embeddings[i]`", s.EmbeddingSpec, ""), ("`controlnets[i]`", s.ControlNetSpec, ""),
        ("`ip_adapter`, `ip_adapters[i]`", s.IpAdapterSpec, ""), ("`vae`", s.VaeSpec, "vae."),
        ("`hires`", s.HiresSpec, "hires."), ("`refiner`", s.RefinerSpec, "refiner."),
        ("`variation`", s.VariationSpec, "variation."), ("`outpaint`", s.OutpaintSpec, "outpaint."),
        ("`train` (`task: \"train\"`, see [training.md](training.md))", s.TrainSpec, "train."),
        ("`convert` (`task: \"convert\"`, see [models.md](models.md))", s.ConvertSpec, "convert."),
    ):
        parts.append(f"### {title}\n\n" + fields_table(model, prefix))
    return "\n".join(parts)


def tables() -> dict[str, tuple[Path, str]]:
    from schemas import InferenceRequest

    docs = ROOT / "docs"
    return {
        "request": (docs / "requests.md", fields_table(InferenceRequest)),
        "nested": (docs / "requests.md", nested_tables()),
        "settings": (docs / "configuration.md", settings_table()),
    }


def rendered() -> dict[Path, str]:
    """Each page as it should read, its tables written in."""
    pages: dict[Path, str] = {}
    for name, (path, table) in tables().items():
        text = pages.get(path) or path.read_text()
        start, end = f"<!-- generated: {name} -->", f"<!-- end: {name} -->"
        before, found, rest = text.partition(start)
        if not found or end not in rest:
            raise SystemExit(f"{path}: no {start} ... {end} markers")
        pages[path] = before + start + "\n" + table + end + rest.partition(end)[2]
    return pages


def main() -> None:
    stale = [path for path, text in rendered().items() if path.read_text() != text]
    if "--check" in sys.argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run tools/docs_tables.py")
        raise SystemExit(1 if stale else 0)
    for path, text in rendered().items():
        path.write_text(text)


if __name__ == "__main__":
    main()
