"""CloudZero's own examples, once: the three request bodies of "# Examples" on the Allocation Telemetry
API page (docs.cloudzero.com/reference/allocation-telemetry-api-1, kept outside the repository in
shared/reference/allocation-telemetry-api.md) and the filter of its "# Limits".

The bodies are the page's code blocks byte for byte, tabs and the final newline included, so they can be
sent as they are; tests/unit/test_records_golden.py checks them against the stored page when it is at hand.
The client and the emulator share records.py, so a wrong rule would pass both: these are the outside truth.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "DELETE_EXAMPLE",
    "EXAMPLE_ELEMENT",
    "EXAMPLE_FILTER",
    "EXAMPLE_STREAM",
    "EXAMPLE_TIMESTAMP",
    "LIMITS_FILTER",
    "REFERENCE",
    "REPLACE_EXAMPLE",
    "SUM_EXAMPLE",
]

# Where the page is stored (beside the repository, not in it): <repository>/../shared/reference/.
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "allocation-telemetry-api.md"

# The stream the examples are sent to, and what their one record is about.
EXAMPLE_STREAM = "my-allocation-stream"
EXAMPLE_TIMESTAMP = "2020-01-25T00:00:00Z"
EXAMPLE_ELEMENT = "<HOOLI-CUSTOMER-ID>"
EXAMPLE_FILTER = {"custom:feature": ["billing"], "tag:environment": ["prod"], "tag:owner": ["frank", "sandy"]}

# "## Sum Allocation Telemetry Record": sent to .../allocation/my-allocation-stream/sum.
SUM_EXAMPLE = (
    "{\n"
    '  "records": [\n'
    "    {\n"
    '    \t"timestamp": "2020-01-25T00:00:00Z",\n'
    '    \t"granularity": "DAILY",\n'
    '    \t"filter": {\n'
    '      \t"custom:feature": [\n'
    '        \t"billing"\n'
    "      \t],\n"
    '      \t"tag:environment": [\n'
    '          "prod"\n'
    "        ],\n"
    '        "tag:owner": [\n'
    '          "frank",\n'
    '          "sandy"\n'
    "        ]\n"
    "    \t},\n"
    '    \t"element_name": "<HOOLI-CUSTOMER-ID>",\n'
    '    \t"value": "250000000"\n'
    "    }\n"
    "  ]\n"
    "}\n"
)

# "## Replace Allocation Telemetry Record": the same record, another value, sent to .../replace.
REPLACE_EXAMPLE = (
    "{\n"
    '  "records": [\n'
    "    {\n"
    '    \t"timestamp": "2020-01-25T00:00:00Z",\n'
    '    \t"granularity": "DAILY",\n'
    '    \t"filter": {\n'
    '      \t"custom:feature": [\n'
    '        \t"billing"\n'
    "      \t],\n"
    '      \t"tag:environment": [\n'
    '          "prod"\n'
    "        ],\n"
    '        "tag:owner": [\n'
    '          "frank",\n'
    '          "sandy"\n'
    "        ]\n"
    "    \t},\n"
    '    \t"element_name": "<HOOLI-CUSTOMER-ID>",\n'
    '    \t"value": "150000000"\n'
    "    }\n"
    "  ]\n"
    "}\n"
)

# "## Delete Allocation Telemetry Record": the same record without a value, sent to .../delete.
DELETE_EXAMPLE = (
    "{\n"
    '  "records": [\n'
    "    {\n"
    '    \t"timestamp": "2020-01-25T00:00:00Z",\n'
    '    \t"granularity": "DAILY",\n'
    '    \t"filter": {\n'
    '      \t"custom:feature": [\n'
    '        \t"billing"\n'
    "      \t],\n"
    '      \t"tag:environment": [\n'
    '          "prod"\n'
    "        ],\n"
    '        "tag:owner": [\n'
    '          "frank",\n'
    '          "sandy"\n'
    "        ]\n"
    "    \t},\n"
    '    \t"element_name": "<HOOLI-CUSTOMER-ID>"\n'
    "    }\n"
    "  ]\n"
    "}\n"
)

# From "# Limits": `{ "account": ["1", "2"], "service": ["A"] }`.
LIMITS_FILTER = {"account": ["1", "2"], "service": ["A"]}
