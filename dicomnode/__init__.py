"""dicomnode: a DICOM node beside the PACS that runs imaging AI. Not for clinical use."""

__version__ = "0.1.0"
