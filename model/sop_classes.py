"""SOP Class UIDs both the model side and the node need, kept here so model/ imports nothing from node/.

Plain strings, no imports: node/header.py and model/volume.py share these.
"""

from __future__ import annotations

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"

# Multi-frame SOP classes whose single object carries a whole series.
MULTIFRAME_SERIES_SOP_CLASSES = frozenset({ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE})
