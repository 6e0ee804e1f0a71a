"""Clinical outputs of the gateway: FHIR resources to an EHR, DICOM objects to a PACS."""
