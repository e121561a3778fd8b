"""docs/conformance.md's generated tables match the code, and the check notices when they do not."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
)

from node import conformance
from node.conformance import (
    BEGIN,
    DOC,
    END,
    blocks_in,
    code_lists,
    drift,
    generate,
    main,
    rewrite,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lists() -> conformance.CodeLists:
    return code_lists()


def test_doc_blocks_equal_the_generated_ones(lists):
    text = DOC.read_text(encoding="utf-8")
    assert drift(text, generate(lists)) == [], "run: python -m node.conformance --write"
    assert set(blocks_in(text)) == set(conformance.BLOCKS)


def test_check_command_passes_on_the_repository_doc(capsys):
    assert main(["--check"]) == 0
    assert "match the code" in capsys.readouterr().out


def test_a_changed_list_is_reported_as_drift_of_its_block(lists):
    """Generate from the code's lists with one transfer syntax fewer accepted: only that block drifts."""
    contexts = tuple((uid, tuple(ts for ts in tss if ts != JPEGBaseline8Bit)) for uid, tss in lists.scp_contexts)
    changed = dataclasses.replace(lists, scp_contexts=contexts)
    text = DOC.read_text(encoding="utf-8")
    assert drift(text, generate(changed)) == ["scp-transfer-syntaxes: differs from the code"]

    # A private SOP class added to the defaults: the SCP table and the configuration table drift.
    extra = "1.3.46.670589.11.0.0.12.3"
    changed = dataclasses.replace(
        lists,
        scp_contexts=(*lists.scp_contexts, (extra, lists.scp_contexts[-1][1])),
        private_sop_classes=(*lists.private_sop_classes, extra),
        config_rows=tuple((s, k, "`changed`" if k == "private_sop_classes" else d, a) for s, k, d, a in lists.config_rows),
    )
    assert drift(text, generate(changed)) == ["scp-sop-classes: differs from the code",
                                              "configuration: differs from the code"]


def test_check_fails_on_a_tampered_copy_and_write_repairs_it(tmp_path, capsys):
    original = DOC.read_text(encoding="utf-8")
    row = "| JPEG Baseline (Process 1) | 1.2.840.10008.1.2.4.50 | yes |  |\n"
    assert row in original
    doc = tmp_path / "conformance.md"
    doc.write_text(original.replace(row, ""), encoding="utf-8")

    assert main(["--check", "--doc", str(doc)]) == 1
    err = capsys.readouterr().err
    assert "generated block scp-transfer-syntaxes: differs from the code" in err
    assert "scp-sop-classes" not in err

    assert main(["--write", "--doc", str(doc)]) == 0
    assert doc.read_text(encoding="utf-8") == original
    assert main(["--check", "--doc", str(doc)]) == 0


def test_prose_outside_the_blocks_is_left_alone(lists):
    blocks = generate(lists)
    text = "intro\n\n" + "\n\nprose\n\n".join(f"{BEGIN.format(name=n)}\nstale\n{END}" for n in blocks) + "\n\nend\n"
    new = rewrite(text, blocks)
    assert new.startswith("intro\n\n") and new.endswith("\n\nend\n") and new.count("\n\nprose\n\n") == len(blocks) - 1
    assert drift(new, blocks) == []


def test_missing_and_unknown_blocks_are_reported(lists, tmp_path, capsys):
    blocks = generate(lists)
    text = DOC.read_text(encoding="utf-8")
    start, end = BEGIN.format(name="codes"), END
    i = text.index(start)
    without = text[:i] + text[text.index(end, i) + len(end):]
    assert drift(without, blocks) == [f"codes: missing (add {start} ... {end})"]
    with pytest.raises(ValueError, match="codes"):
        rewrite(without, blocks)
    unknown = text + f"\n{BEGIN.format(name='no-such-table')}\n| x |\n{END}\n"
    assert drift(unknown, blocks) == ["no-such-table: not a generated block (unknown name)"]
    doc = tmp_path / "c.md"
    doc.write_text(without, encoding="utf-8")
    assert main(["--check", "--doc", str(doc)]) == 1
    assert "generated block codes: missing" in capsys.readouterr().err


def test_tables_hold_what_the_code_uses(lists):
    """Spot checks against the modules themselves, read independently of the generator's own lists."""
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    )

    from node import retrieve, scp
    from node.config import NodeSection

    blocks = generate(lists)
    for uid in scp.TRANSFER_SYNTAXES:
        assert f"| {uid} |" in blocks["scp-transfer-syntaxes"]
    for uid in scp.NOT_ACCEPTED:
        assert f"| {uid} |" in blocks["scp-refused-transfer-syntaxes"]
        assert f"| {uid} |" not in blocks["scp-transfer-syntaxes"]
    for uid in NodeSection().private_sop_classes:
        assert f"| {uid} | SCP |" in blocks["scp-sop-classes"]
    assert "Philips Private MR Series Data Storage" in blocks["scp-sop-classes"]
    for uid in (ComprehensiveSRStorage, SecondaryCaptureImageStorage, StudyRootQueryRetrieveInformationModelGet,
                StudyRootQueryRetrieveInformationModelMove, *retrieve.RETRIEVED_CLASSES):
        assert f"| {uid} |" in blocks["scu-sop-classes"]
    assert "STOW-RS" in blocks["scu-sop-classes"]
    for scheme, value in (("99MIGRNODE", "P001"), ("99MIGRNODE", "R"), ("99MIGRNODE", "N"), ("SCT", "12738006"),
                          ("LN", "24590-2"), ("DCM", "122157"), ("UCUM", "%"), ("DCM", "121322")):
        assert f"| {scheme} | {value} |" in blocks["codes"]
    assert "| 99MIGRNODE | migraine-node private codes |" in blocks["coding-schemes"]


def test_result_sop_classes_are_read_from_the_builders_source():
    assert conformance.sr_sop_class(ROOT / "node" / "report.py") == ComprehensiveSRStorage
    assert conformance.image_sop_class(ROOT / "node" / "result_image.py") == SecondaryCaptureImageStorage


def test_code_uses_reads_codes_and_code_calls(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from pydicom.sr.codedict import codes\n"
        "from pydicom.sr.coding import Code\n"
        'SCHEME = "99TEST"\n'
        'MINE = Code("X1", SCHEME, "Mine")\n'
        "def f():\n"
        "    return codes.SCT.Brain\n",
        encoding="utf-8",
    )
    uses = conformance.code_uses(source, "m.py")
    assert uses == [conformance.CodeUse("99TEST", "X1", "Mine", "`m.py` MINE"),
                    conformance.CodeUse("SCT", "12738006", "Brain", "`m.py`")]
    source.write_text("from pydicom.sr.coding import Code\nX = Code(compute(), 'DCM', 'y')\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read Code"):
        conformance.code_uses(source, "m.py")


def test_an_unnamed_coding_scheme_stops_the_generator(lists):
    changed = dataclasses.replace(lists, code_uses=(*lists.code_uses, conformance.CodeUse("XYZ", "1", "x", "here")))
    with pytest.raises(ValueError, match="XYZ"):
        generate(changed)


def test_the_check_does_not_import_torch():
    """The generator stays light: torch, highdicom and matplotlib are never imported."""
    probe = ("import sys, node.conformance as c; rc = c.main(['--check']); "
             "heavy = sorted({'torch', 'highdicom', 'matplotlib'} & set(sys.modules)); "
             "print('heavy:', heavy); sys.exit(rc or bool(heavy))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "heavy: []" in result.stdout
