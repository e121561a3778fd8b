"""migraine-node: DICOM networking, series tracking, worker and SR export."""

__version__ = "0.1.0"
