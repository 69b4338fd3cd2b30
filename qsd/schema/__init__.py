# SPDX-License-Identifier: GPL-2.0-or-later
"""The QAPI-like schema: validation, keyval coercion and introspection.

``get_schema()`` loads ``schema/*.json`` once; see ``docs/CONTRACTS.md``.
"""

from qsd.schema.model import SchemaDefinitionError
from qsd.schema.schema import Schema, get_schema

__all__ = ["Schema", "SchemaDefinitionError", "get_schema"]
