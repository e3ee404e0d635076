"""Readers (BraTS, Decathlon, NRRD/MHA/DICOM), phantom cohorts, preprocessing, slice cache and dataset."""
