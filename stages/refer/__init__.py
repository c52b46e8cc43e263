"""REFER-format data: data manifests (`manifests`), reading and checking the REFER files
(`files`, `geometry`), multi-view expressions as REFER training sentences (`views`) and the
synthetic demo data in the same formats (`synthetic`)."""
