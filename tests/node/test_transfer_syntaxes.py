"""Every transfer syntax the SCP accepts decodes: encode, send, spool, assemble.

A small synthetic series is encoded in each syntax of `node.scp.TRANSFER_SYNTAXES`
(DCMTK's dcmconv/dcmcjpeg/dcmcjpls/dcmcrle where DCMTK can write it, imagecodecs'
OpenJPH for HTJ2K, which neither DCMTK nor pydicom can encode), sent to the
in-process node proposing that syntax (DCMTK storescu where it can propose it,
a pynetdicom SCU otherwise), and the spooled files must assemble into the same
volume as the uncompressed series (lossless) or a close one (lossy).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from model.synth import write_series
from model.volume import assemble_volume
from node.scp import NOT_ACCEPTED, TRANSFER_SYNTAXES
from tests.peers import DCMTK_ENV, scu_store, storescu, wait_until

SLICES = 8

# syntax -> (DCMTK encoder command or None for a Python encoder, storescu proposal option or None for pynetdicom)
DCMTK: dict[UID, tuple[tuple[str, ...] | None, tuple[str, ...] | None]] = {
    ExplicitVRLittleEndian: (None, ("-xe",)),
    ImplicitVRLittleEndian: (("/usr/bin/dcmconv", "+ti"), ("-xi",)),
    DeflatedExplicitVRLittleEndian: (("/usr/bin/dcmconv", "+td"), ("-xd",)),
    ExplicitVRBigEndian: (("/usr/bin/dcmconv", "+tb"), ("-xb",)),
    JPEGLossless: (("/usr/bin/dcmcjpeg", "+el", "+un"), None),
    JPEGLosslessSV1: (("/usr/bin/dcmcjpeg", "+e1", "+un"), ("-xs",)),
    JPEGLSLossless: (("/usr/bin/dcmcjpls", "+el", "+un"), ("-xt",)),
    JPEGLSNearLossless: (("/usr/bin/dcmcjpls", "+en", "+un"), ("-xu",)),
    JPEG2000Lossless: (None, ("-xv",)),
    JPEG2000: (None, ("-xw",)),
    HTJ2KLossless: (None, None),
    HTJ2KLosslessRPCL: (None, None),
    HTJ2K: (None, None),
    RLELossless: (("/usr/bin/dcmcrle", "+un"), ("-xr",)),
    # Lossy JPEG: +sr +rm keep modality values (scale by the pixel range and say so in RescaleSlope);
    # dcmcjpeg's default rescales each slice to its own min/max and writes slope 1.
    JPEGBaseline8Bit: (("/usr/bin/dcmcjpeg", "+eb", "+un", "+sr", "+rm"), ("-xy",)),
    JPEGExtended12Bit: (("/usr/bin/dcmcjpeg", "+ee", "+un", "+sr", "+rm"), ("-xx",)),
}
LOSSY = {JPEGLSNearLossless, JPEG2000, HTJ2K, JPEGBaseline8Bit, JPEGExtended12Bit}


def test_every_accepted_syntax_has_an_encoding_here():
    assert set(TRANSFER_SYNTAXES) <= set(DCMTK)
    assert set(DCMTK) == {*TRANSFER_SYNTAXES, *NOT_ACCEPTED}


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> tuple[Path, np.ndarray]:
    out = tmp_path_factory.mktemp("ts-orig")
    write_series(out, slices=SLICES, rows=64, columns=64, seed=3)
    reference = assemble_volume([pydicom.dcmread(p) for p in sorted(out.iterdir())]).array
    return out, reference


def _htj2k(src: Path, dst: Path, syntax: UID) -> None:
    import imagecodecs  # test extra: OpenJPH encodes the HTJ2K test data (a missing encoder must fail, not skip)
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    reversible = syntax != HTJ2K
    frame = imagecodecs.htj2k_encode(arr, reversible=reversible)  # irreversible: 9/7 wavelet
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    if not reversible:
        ds.LossyImageCompression = "01"
    ds.save_as(dst, enforce_file_format=True)


def encode(src_dir: Path, dst_dir: Path, syntax: UID) -> list[Path]:
    dst_dir.mkdir()
    command, _ = DCMTK[syntax]
    for src in sorted(src_dir.iterdir()):
        dst = dst_dir / src.name
        if syntax == ExplicitVRLittleEndian:
            dst.write_bytes(src.read_bytes())
        elif command is not None:
            subprocess.run([*command, str(src), str(dst)], check=True, capture_output=True, env=DCMTK_ENV, timeout=60)
        elif syntax in (JPEG2000Lossless, JPEG2000):
            ds = pydicom.dcmread(src)
            kwargs = {} if syntax == JPEG2000Lossless else {"j2k_cr": [10]}
            ds.compress(syntax, generate_instance_uid=False, **kwargs)
            ds.save_as(dst, enforce_file_format=True)
        else:
            _htj2k(src, dst, syntax)
    files = sorted(dst_dir.iterdir())
    assert {pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID for f in files} == {syntax}
    return files


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda ts: ts.keyword or str(ts))
def test_syntax_is_received_spooled_and_decoded(in_process_node, series, tmp_path, syntax):
    src_dir, reference = series
    files = encode(src_dir, tmp_path / "encoded", syntax)
    svc = in_process_node()
    proposal = DCMTK[syntax][1]
    if proposal is not None:
        result = storescu(files, svc.port, extra=("-R", *proposal))
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert scu_store(svc.port, *files, transfer_syntax=syntax) == [0] * len(files)  # files as they are

    spooled = wait_until(lambda: (s := sorted(svc.spool.root.glob("*/*/*.dcm"))) and len(s) == SLICES and s,
                         timeout=10, what="spooled files")
    datasets = [pydicom.dcmread(p) for p in spooled]
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {syntax}
    array = assemble_volume(datasets).array
    assert array.shape == reference.shape
    if syntax in LOSSY:
        # Lossy: the same image within a few percent (JPEG baseline holds 8 of the 12 bits).
        assert np.corrcoef(array.ravel(), reference.ravel())[0, 1] > 0.98
        assert np.abs(array - reference).mean() < 0.02 * np.ptp(reference)
    else:
        np.testing.assert_array_equal(array, reference)


@pytest.mark.parametrize("syntax", NOT_ACCEPTED, ids=lambda ts: ts.keyword or str(ts))
def test_undecodable_syntax_is_negotiated_away(in_process_node, series, tmp_path, syntax):
    """Proposed, the syntax gets no presentation context, so nothing is acknowledged (a sender
    falls back to another context it proposed, or reports the failure; it never sees success)."""
    src_dir, _ = series
    files = encode(src_dir, tmp_path / "encoded", syntax)
    svc = in_process_node()
    result = storescu(files, svc.port, extra=("-R", *DCMTK[syntax][1]))
    assert result.returncode != 0
    assert "unable to convert dataset from 'JPEG Extended" in result.stderr, result.stderr  # only LE was accepted
    assert list(svc.spool.root.glob("*/*/*.dcm")) == []
    assert svc.store.count_instances() == 0
