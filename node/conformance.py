"""The generated tables of docs/conformance.md, built from the code's own lists.

docs/conformance.md keeps each table between marker comments::

    <!-- generated: scp-transfer-syntaxes -->
    | ... |
    <!-- end generated -->

`python -m node.conformance --write` rewrites every block in place;
`python -m node.conformance --check` exits 1 and names each block that no
longer matches the code (tests/node/test_conformance.py runs the check).

The lists come from where the node uses them: the acceptor that node/scp.py
builds (`build_ae`, so its SOP classes and transfer syntaxes are the ones
offered), node/config.py (private SOP classes, result kinds, how a destination
retrieves, the DICOMweb url), node/export.py and node/retrieve.py (what the
SCUs propose), node/echo.py, storage/spool.py (Part 10 file meta). The SR and
the result image are read as source (ast), not imported: node/report.py and
node/result_image.py pull in torch through model/predict.py, and this module
stays light (no torch, no highdicom, no matplotlib).

Everything below `code_lists()` is pure: lists in, markdown out.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.sr.codedict import codes
from pydicom.uid import UID

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "conformance.md"
_NODE = Path(__file__).resolve().parent

BEGIN = "<!-- generated: {name} -->"
END = "<!-- end generated -->"
_BLOCK = re.compile(r"<!-- generated: (?P<name>[a-z0-9-]+) -->\n(?P<body>.*?)<!-- end generated -->", re.DOTALL)

# Coding scheme designators (PS3.16 8) a table may name; a designator the code starts to use and
# that is missing here stops the generator, so the table never shows one without its name.
SCHEME_NAMES: Mapping[str, str] = {
    "DCM": "DICOM Controlled Terminology (PS3.16 Annex D)",
    "SCT": "SNOMED CT",
    "LN": "LOINC",
    "UCUM": "Unified Code for Units of Measure",
}

# What each result kind (node/config.py ResultKind) is and which module builds it.
RESULT_MODULES: Mapping[str, tuple[str, str]] = {
    "sr": ("node/report.py", "the result: the TID 1500 Structured Report"),
    "image": ("node/result_image.py", "the result image (for viewers that show no SR)"),
}


@dataclass(frozen=True)
class CodeUse:
    """One coded concept that a result builder names in its source."""

    scheme: str
    value: str
    meaning: str
    where: str  # file, and the module constant that holds it when there is one


@dataclass(frozen=True)
class ResultObject:
    kind: str  # a [[destinations]] objects value
    sop_class_uid: str
    module: str
    what: str


@dataclass(frozen=True)
class CodeLists:
    """Everything the tables are made of, as the code has it."""

    # The acceptor's presentation contexts: (abstract syntax, transfer syntaxes), in offer order.
    scp_contexts: tuple[tuple[str, tuple[str, ...]], ...]
    verification: str
    classified_sop_classes: frozenset[str]
    private_sop_classes: tuple[str, ...]
    private_names: Mapping[str, str]
    not_accepted: tuple[str, ...]
    results: tuple[ResultObject, ...]
    dicomweb: bool
    export_syntaxes: tuple[str, ...]
    echo_sop_class: str
    retrieve_models: tuple[tuple[str, str], ...]  # (SOP class UID, when it is used)
    retrieved_classes: tuple[str, ...]
    retrieve_syntaxes: tuple[str, ...]
    association: tuple[tuple[str, str, str], ...]  # (parameter, value, where it is set)
    code_uses: tuple[CodeUse, ...]
    private_scheme: tuple[str, str]  # (designator, name) declared in the SR
    default_syntaxes: tuple[str, ...]  # pynetdicom's, for contexts proposed without a list
    config_rows: tuple[tuple[str, str, str, str], ...]  # (section, key, default, allowed values)
    syntax_order: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# Reading the code


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "literal" assignments."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _codes_attribute(node: ast.AST) -> tuple[str, str] | None:
    """`codes.SCHEME.Keyword` (or `codes.cidNNN.Keyword`) -> (SCHEME, Keyword)."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "codes"
    ):
        return node.value.attr, node.attr
    return None


def _resolve_code(node: ast.AST, strings: Mapping[str, str]):  # returns a pydicom Code or None
    from pydicom.sr.coding import Code

    ref = _codes_attribute(node)
    if ref is not None:
        return getattr(getattr(codes, ref[0]), ref[1])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Code":
        args = []
        for arg in node.args[:3]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                args.append(arg.value)
            elif isinstance(arg, ast.Name) and arg.id in strings:
                args.append(strings[arg.id])
            else:
                raise ValueError(f"cannot read Code(...) at line {node.lineno}: use literals or module constants")
        return Code(*args)
    return None


def code_uses(path: Path, label: str) -> list[CodeUse]:
    """Every `codes.X.Y` and `Code(...)` in a source file, named by the module constant holding it."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    strings = _module_strings(tree)
    owner: dict[int, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            for sub in ast.walk(node.value):
                owner[id(sub)] = node.targets[0].id
    uses = []
    for node in ast.walk(tree):
        code = _resolve_code(node, strings)
        if code is not None:
            where = f"`{label}` {owner[id(node)]}" if id(node) in owner else f"`{label}`"
            uses.append(((node.lineno, node.col_offset), CodeUse(code.scheme_designator, code.value, code.meaning, where)))
    return [use for _, use in sorted(uses, key=lambda item: item[0])]


def _imported_names(tree: ast.Module, module: str) -> list[str]:
    return [alias.asname or alias.name for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == module for alias in node.names]


def sr_sop_class(path: Path) -> str:
    """The SR IOD that node/report.py builds: the highdicom SR class it calls (ComprehensiveSR ->
    Comprehensive SR Storage)."""
    import pydicom.uid

    tree = ast.parse(path.read_text(encoding="utf-8"))
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    classes = [name for name in _imported_names(tree, "highdicom.sr") if name.endswith("SR") and name in called]
    if len(classes) != 1:
        raise ValueError(f"{path}: expected one highdicom SR class built, found {classes}")
    return str(getattr(pydicom.uid, classes[0] + "Storage"))


def image_sop_class(path: Path) -> str:
    """The storage SOP class that node/result_image.py writes (imported from pydicom.uid)."""
    import pydicom.uid

    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = [name for name in _imported_names(tree, "pydicom.uid")
               if name.endswith("Storage") and not getattr(pydicom.uid, name).is_transfer_syntax]
    if len(classes) != 1:
        raise ValueError(f"{path}: expected one storage SOP class from pydicom.uid, found {classes}")
    return str(getattr(pydicom.uid, classes[0]))


def private_sop_class_names(path: Path, uids: Iterable[str]) -> dict[str, str]:
    """The comment beside each default private SOP class in node/config.py, its name."""
    text = path.read_text(encoding="utf-8")
    names = {}
    for uid in uids:
        match = re.search(r'"' + re.escape(uid) + r'",?\s*#\s*(?P<name>[^\n]+)', text)
        names[uid] = match["name"].strip() if match else "private SOP class"
    return names


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _setting(info) -> tuple[str, str]:  # info: a pydantic FieldInfo
    """(default, allowed values) of one configuration key, as TOML."""
    if info.is_required():
        default = "(required)"
    elif info.default is None:
        default = "(unset)"
    else:
        default = f"`{_toml(info.default)}`"
    annotation = info.annotation
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    allowed = ""
    if typing.get_origin(annotation) is typing.Literal:
        allowed = ", ".join(f"`{_toml(v)}`" for v in typing.get_args(annotation))
    bounds = {name: getattr(m, name) for m in info.metadata for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    if bounds:
        low = f"{_toml(bounds['ge'])} ≤" if "ge" in bounds else f"{_toml(bounds['gt'])} <" if "gt" in bounds else ""
        high = f"≤ {_toml(bounds['le'])}" if "le" in bounds else f"< {_toml(bounds['lt'])}" if "lt" in bounds else ""
        allowed = " ".join(p for p in (low, "value", high) if p)
    return default, allowed


def _uids_in(module: object, predicate: Callable[[UID], bool]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(v) for v in vars(module).values() if isinstance(v, UID) and predicate(v)))


def code_lists() -> CodeLists:
    """Read every list the tables show from the code (imports stay torch-free)."""
    import pynetdicom
    from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES

    from model import sop_classes
    from node import config, echo, export, retrieve, scp
    from storage import spool

    settings = config.Settings.model_construct()  # the defaults; no environment, no file
    ae = scp.build_ae(settings)
    contexts = tuple((str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
                     for cx in ae.supported_contexts)
    private = tuple(settings.node.private_sop_classes)

    results = []
    kinds = typing.get_args(config.ResultKind)
    if set(kinds) != set(RESULT_MODULES):
        raise ValueError(f"node/config.py ResultKind is {kinds}; RESULT_MODULES here knows {sorted(RESULT_MODULES)}")
    for kind in kinds:
        module, what = RESULT_MODULES[kind]
        reader = sr_sop_class if kind == "sr" else image_sop_class
        results.append(ResultObject(kind, reader(ROOT / module), module, what))

    export_syntaxes = getattr(export, "PROPOSED_TRANSFER_SYNTAXES", None) or _uids_in(
        export, lambda u: u.is_transfer_syntax)
    retrieve_syntaxes = getattr(retrieve, "PROPOSED_TRANSFER_SYNTAXES", None) or _uids_in(
        retrieve, lambda u: u.is_transfer_syntax)

    # Q/R models: those node/retrieve.py imports, and one per `retrieve` choice of a destination.
    how = typing.get_args(config.Destination.model_fields["retrieve"].annotation)
    models: dict[str, str] = {}
    for choice in how:
        keyword = f"StudyRootQueryRetrieveInformationModel{choice.capitalize()}"
        models[str(getattr(pynetdicom.sop_class, keyword))] = \
            f'`replay --from-pacs`, from a destination with `retrieve = "{choice}"`'
    for uid in _uids_in(retrieve, lambda u: "Query/Retrieve" in u.name):
        models.setdefault(uid, "`replay --from-pacs` (`node/retrieve.py`)")

    scu_sources = [ROOT / "node" / name for name in ("export.py", "retrieve.py", "echo.py")]
    if any("maximum_pdu_size" in p.read_text(encoding="utf-8") for p in scu_sources):
        raise ValueError("an SCU now sets maximum_pdu_size: update the association table in node/conformance.py")
    scu_ae = pynetdicom.AE()
    timeout = config.ExportSection().timeout_seconds
    association = (
        ("AE title", f"`{config.NodeSection().ae_title}` (default)", "`[node] ae_title`; also the Calling AE Title of every SCU"),
        ("Maximum simultaneous associations (SCP)", str(ae.maximum_associations) + " (default)",
         "`[node] max_associations`"),
        ("Maximum PDU size received (SCP)", "unlimited (0)" if ae.maximum_pdu_size == 0 else str(ae.maximum_pdu_size),
         "`node/scp.py` build_ae"),
        ("Maximum PDU size received (SCUs)", str(scu_ae.maximum_pdu_size), "pynetdicom default"),
        ("Called AE Title checked", "yes" if ae.require_called_aet else "no", "`node/scp.py` build_ae"),
        ("Calling AE Title checked", "when `[node] allowed_calling_aets` is not empty", "`node/scp.py` build_ae"),
        ("ACSE / DIMSE / network timeout (SCP)", f"{ae.acse_timeout:g} / {ae.dimse_timeout:g} / {ae.network_timeout:g} s",
         "pynetdicom defaults"),
        ("Timeouts (C-STORE SCU)", f"{timeout:g} s (default)", "`[export] timeout_seconds`"),
        ("Asynchronous operations window", "not negotiated (one operation at a time)", "pynetdicom"),
        ("Implementation Class UID (associations)", f"`{ae.implementation_class_uid}`",
         "`node/dimse_tuning.py` node_ae (SCP and every SCU)"),
        ("Implementation Version Name (associations)", f"`{ae.implementation_version_name}`",
         "`node/dimse_tuning.py` node_ae (SCP and every SCU)"),
        ("Implementation Class UID (Part 10 files in the spool)", f"`{spool.IMPLEMENTATION_CLASS_UID}`",
         "`storage/spool.py`"),
        ("Implementation Version Name (Part 10 files in the spool)", f"`{spool.IMPLEMENTATION_VERSION_NAME}`",
         "`storage/spool.py`"),
    )

    uses = [u for module, _ in RESULT_MODULES.values() for u in code_uses(ROOT / module, module)]
    report_strings = _module_strings(ast.parse((ROOT / "node" / "report.py").read_text(encoding="utf-8")))

    return CodeLists(
        scp_contexts=contexts,
        verification=str(pynetdicom.sop_class.Verification),
        classified_sop_classes=frozenset({sop_classes.MR_IMAGE_STORAGE, *sop_classes.MULTIFRAME_SERIES_SOP_CLASSES}),
        private_sop_classes=private,
        private_names=private_sop_class_names(_NODE / "config.py", private),
        not_accepted=tuple(str(u) for u in scp.NOT_ACCEPTED),
        results=tuple(results),
        dicomweb="url" in config.Destination.model_fields,
        export_syntaxes=tuple(str(u) for u in export_syntaxes),
        echo_sop_class=str(echo.Verification),
        retrieve_models=tuple(models.items()),
        retrieved_classes=tuple(str(u) for u in retrieve.RETRIEVED_CLASSES),
        retrieve_syntaxes=tuple(str(u) for u in retrieve_syntaxes),
        association=association,
        code_uses=tuple(uses),
        private_scheme=(report_strings["CODING_SCHEME"], report_strings["CODING_SCHEME_NAME"]),
        default_syntaxes=tuple(str(u) for u in DEFAULT_TRANSFER_SYNTAXES),
        config_rows=tuple(
            (section, key, *_setting(info))
            for section, model in (("[node]", config.NodeSection), ("[export]", config.ExportSection),
                                   ("[[destinations]]", config.Destination))
            for key, info in model.model_fields.items()
        ),
        syntax_order=tuple(str(u) for u in scp.TRANSFER_SYNTAXES),
    )


# ---------------------------------------------------------------------------------------------
# Tables (pure)


def _split_camel(keyword: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", keyword)


def uid_name(uid: str, private_names: Mapping[str, str] | None = None) -> str:
    """pydicom's name for a UID; pynetdicom's keyword (spaced) for one pydicom does not know yet."""
    if private_names and uid in private_names:
        return private_names[uid]
    name = UID(uid).name
    if name != uid:
        return name
    import pynetdicom.sop_class

    for keyword, value in vars(pynetdicom.sop_class).items():
        if isinstance(value, UID) and str(value) == uid and not keyword.startswith(("_", "PrivateStorage_")):
            return _split_camel(keyword)
    return "(unnamed)"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _names(uids: Iterable[str]) -> str:
    return ", ".join(uid_name(u) for u in uids)


def _ordered(uids: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {u: i for i, u in enumerate(order)}
    return sorted(dict.fromkeys(uids), key=lambda u: (rank.get(u, len(rank)), [int(p) for p in u.split(".")]))


def association_table(lists: CodeLists) -> str:
    return table(("Parameter", "Value", "Set by"), lists.association)


def scp_sop_classes_table(lists: CodeLists) -> str:
    offered = [uid for uid, _ in lists.scp_contexts]
    rows = []
    for uid in offered:
        if uid == lists.verification:
            rows.append((uid_name(uid), uid, "SCP", "C-ECHO"))
        elif uid in lists.classified_sop_classes:
            rows.append((uid_name(uid), uid, "SCP", "C-STORE: stored, and classified when selection accepts the series"))
        elif uid in lists.private_sop_classes:
            rows.append((uid_name(uid, lists.private_names), uid, "SCP",
                         "C-STORE: stored with its series, never classified (`[node] private_sop_classes`)"))
    others = len(offered) - len(rows)
    rows.append((f"Every other Storage SOP class ({others}, listed below)", "", "SCP", "C-STORE: stored, never classified"))
    return table(("SOP class", "UID", "Role", "Use"), rows)


def scp_storage_sop_classes_table(lists: CodeLists) -> str:
    shown = {lists.verification, *lists.classified_sop_classes, *lists.private_sop_classes}
    rows = [(uid_name(uid), uid) for uid, _ in lists.scp_contexts if uid not in shown]
    return "<details><summary>All other Storage SOP classes accepted as SCP</summary>\n\n" + \
        table(("SOP class", "UID"), rows) + "\n\n</details>"


def _syntax_groups(lists: CodeLists) -> list[tuple[str, tuple[str, ...]]]:
    """The distinct transfer syntax lists the acceptor offers, each with what it is offered for."""
    storage = {ts for uid, ts in lists.scp_contexts if uid != lists.verification}
    if len(storage) != 1:
        raise ValueError("the SCP offers different transfer syntaxes per storage SOP class: "
                         "give node/conformance.py a table per SOP class")
    verification = [ts for uid, ts in lists.scp_contexts if uid == lists.verification]
    return [("Storage", storage.pop()), ("Verification", verification[0] if verification else ())]


def scp_transfer_syntaxes_table(lists: CodeLists) -> str:
    groups = _syntax_groups(lists)
    every = _ordered((ts for _, tss in groups for ts in tss), lists.syntax_order)
    rows = [(uid_name(ts), ts, *("yes" if ts in tss else "" for _, tss in groups)) for ts in every]
    return table(("Transfer syntax", "UID", *(f"{label} SCP" for label, _ in groups)), rows)


def scp_refused_syntaxes_table(lists: CodeLists) -> str:
    return table(("Transfer syntax", "UID"), [(uid_name(ts), ts) for ts in lists.not_accepted])


def scu_sop_classes_table(lists: CodeLists) -> str:
    rows = []
    for obj in lists.results:
        how = f'C-STORE to each DICOM `[[destinations]]` whose `objects` include `"{obj.kind}"`'
        if lists.dicomweb:
            how += "; STOW-RS to each DICOMweb destination (`url`) that does"
        rows.append((uid_name(obj.sop_class_uid), obj.sop_class_uid, "SCU", f"{obj.what} (`{obj.module}`): {how}"))
    for uid, chosen in lists.retrieve_models:
        rows.append((uid_name(uid), uid, "SCU", chosen))
    for uid in lists.retrieved_classes:
        rows.append((uid_name(uid), uid, "SCP (SCP/SCU role selection)",
                     "`replay --from-pacs`: the instances a C-GET returns on its association"))
    rows.append((uid_name(lists.echo_sop_class), lists.echo_sop_class, "SCU", "`migraine-node echo`"))
    return table(("SOP class", "UID", "Role", "Use"), rows)


def scu_transfer_syntaxes_table(lists: CodeLists) -> str:
    rows = [
        ("C-STORE of the results (`node/export.py`)",
         _names(_ordered(lists.export_syntaxes, lists.syntax_order))),
        ("C-GET: retrieved MR storage, SCP role (`node/retrieve.py`)",
         _names(_ordered(lists.retrieve_syntaxes, lists.syntax_order))),
        ("Q/R and Verification SCU", "pynetdicom's default list: "
         + _names(_ordered(lists.default_syntaxes, lists.syntax_order))),
    ]
    return table(("Presentation contexts", "Transfer syntaxes proposed"), rows)


def coding_schemes_table(lists: CodeLists) -> str:
    designator, name = lists.private_scheme
    schemes = dict.fromkeys(u.scheme for u in lists.code_uses)
    rows = []
    for scheme in schemes:
        if scheme == designator:
            rows.append((scheme, name, "private; declared in the SR's Coding Scheme Identification Sequence"))
        elif scheme in SCHEME_NAMES:
            rows.append((scheme, SCHEME_NAMES[scheme], "standard"))
        else:
            raise ValueError(f"coding scheme {scheme!r} has no name in node/conformance.py SCHEME_NAMES")
    return table(("Designator", "Coding scheme", "Kind"), rows)


def codes_table(lists: CodeLists) -> str:
    seen: dict[tuple[str, str], list] = {}
    for use in lists.code_uses:
        entry = seen.setdefault((use.scheme, use.value), [use.meaning, []])
        if use.where not in entry[1]:
            entry[1].append(use.where)
    rows = [(scheme, value, meaning, "; ".join(where)) for (scheme, value), (meaning, where) in seen.items()]
    return table(("Scheme", "Code value", "Code meaning", "Named in"), rows)


def configuration_table(lists: CodeLists) -> str:
    return table(("Key", "Default", "Allowed"),
                 [(f"{section} `{key}`", default, allowed) for section, key, default, allowed in lists.config_rows])


BLOCKS: Mapping[str, Callable[[CodeLists], str]] = {
    "association-parameters": association_table,
    "scp-sop-classes": scp_sop_classes_table,
    "scp-storage-sop-classes": scp_storage_sop_classes_table,
    "scp-transfer-syntaxes": scp_transfer_syntaxes_table,
    "scp-refused-transfer-syntaxes": scp_refused_syntaxes_table,
    "scu-sop-classes": scu_sop_classes_table,
    "scu-transfer-syntaxes": scu_transfer_syntaxes_table,
    "coding-schemes": coding_schemes_table,
    "codes": codes_table,
    "configuration": configuration_table,
}


def generate(lists: CodeLists) -> dict[str, str]:
    """Every block's markdown."""
    return {name: build(lists) for name, build in BLOCKS.items()}


# ---------------------------------------------------------------------------------------------
# The document


def blocks_in(text: str) -> dict[str, str]:
    """The generated blocks a document holds, by name (content without the surrounding newlines)."""
    found: dict[str, str] = {}
    for match in _BLOCK.finditer(text):
        if match["name"] in found:
            raise ValueError(f"block {match['name']!r} appears twice")
        found[match["name"]] = match["body"].strip("\n")
    return found


def drift(text: str, blocks: Mapping[str, str]) -> list[str]:
    """What differs between a document and the generated blocks, one line each (empty: none)."""
    present = blocks_in(text)
    problems = [f"{name}: missing (add {BEGIN.format(name=name)} ... {END})" for name in blocks if name not in present]
    problems += [f"{name}: differs from the code" for name in blocks if name in present and present[name] != blocks[name]]
    problems += [f"{name}: not a generated block (unknown name)" for name in present if name not in blocks]
    return problems


def rewrite(text: str, blocks: Mapping[str, str]) -> str:
    """The document with each block's content replaced; every block must already have its markers."""
    missing = [name for name in blocks if name not in blocks_in(text)]
    if missing:
        raise ValueError(f"no markers for block(s) {', '.join(missing)}")
    return _BLOCK.sub(lambda m: f"{BEGIN.format(name=m['name'])}\n{blocks.get(m['name'], m['body'].strip())}\n{END}", text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.conformance", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 naming each block that differs from the code")
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks in place")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"the document (default {DOC})")
    args = parser.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    blocks = generate(code_lists())
    if args.write:
        new = rewrite(text, blocks)
        if new != text:
            args.doc.write_text(new, encoding="utf-8")
        print(f"{args.doc}: {'rewritten' if new != text else 'up to date'}")
        return 0
    problems = drift(text, blocks)
    for line in problems:
        print(f"{args.doc}: generated block {line}", file=sys.stderr)
    if problems:
        print("run: python -m node.conformance --write", file=sys.stderr)
        return 1
    print(f"{args.doc}: {len(blocks)} generated blocks match the code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
