"""REFER-format data: data manifests (`manifests`), reading and checking the REFER files
(`files`, `geometry`) and the synthetic demo data in the same formats (`synthetic`)."""
