"""KServe's InferenceService schema, vendored in part, and checked strictly (tests/test_manifests.py).

    python tests/kserve_crd.py CRD.yaml TAG COMMIT    # rewrite tests/schemas/kserve-inferenceservice.json

CRD.yaml: config/crd/full/serving.kserve.io_inferenceservices.yaml of github.com/kserve/kserve at
TAG (COMMIT). Vendored: the v1beta1 openAPIV3Schema with spec.predictor only, and of the predictor
only the fields in PREDICTOR_FIELDS (each with its whole subtree, as the CRD has it). Removing
fields only makes the check stricter: what validates here validates against the whole CRD.
Strict: the API server prunes unknown fields silently; strict() refuses them, as kubernetes-validate
--strict does for the built-in kinds, so a misspelt field fails the test instead of vanishing.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "kserve-inferenceservice.json"
CRD_PATH = "config/crd/full/serving.kserve.io_inferenceservices.yaml"
VERSION = "v1beta1"
PREDICTOR_FIELDS = ("annotations", "containers", "labels", "maxReplicas", "minReplicas", "scaleMetric", "scaleTarget",
                    "securityContext", "serviceAccountName", "terminationGracePeriodSeconds", "timeout", "volumes")


def vendored_part(crd: dict) -> dict:
    (version,) = [entry for entry in crd["spec"]["versions"] if entry["name"] == VERSION]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"].pop("status", None)   # written by the controller, never by a manifest
    spec = schema["properties"]["spec"]
    spec["properties"] = {"predictor": spec["properties"]["predictor"]}
    predictor = spec["properties"]["predictor"]
    predictor["properties"] = {name: predictor["properties"][name] for name in PREDICTOR_FIELDS}
    return schema


def strict(schema: dict) -> dict:
    """A copy in which every object with declared properties refuses undeclared ones (except
    where the CRD keeps unknown fields on purpose: x-kubernetes-preserve-unknown-fields)."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def load() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate(document: dict) -> None:
    """jsonschema.ValidationError when document is no valid InferenceService (strictly)."""
    vendored = load()
    assert document["apiVersion"] == f"{vendored['group']}/{VERSION}" and document["kind"] == vendored["kind"]
    jsonschema.validate(document, strict(vendored["openAPIV3Schema"]))


def main(crd_file: str, tag: str, commit: str) -> None:
    crd = yaml.safe_load(Path(crd_file).read_text())
    SCHEMA_FILE.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_FILE.write_text(json.dumps({
        "source": {"repository": "https://github.com/kserve/kserve", "path": CRD_PATH, "tag": tag, "commit": commit,
                   "written_by": "python tests/kserve_crd.py (the v1beta1 schema, spec.predictor only, "
                                 "predictor fields: " + ", ".join(PREDICTOR_FIELDS) + ")"},
        "group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"],
        "openAPIV3Schema": vendored_part(crd)}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
