# SPDX-License-Identifier: GPL-2.0-or-later
"""``commit_top``: the filter an intermediate commit puts above its top node.

It takes the place of the top node under the overlay that uses it as
backing file, so that on completion one ``replace_node(filter, base)``
drops every committed layer out of the chain at once; until then it only
passes reads through (the committed layers are read-only anyway).
"""

from __future__ import annotations

from qsd.block.filters import FilterNode


class CommitTopNode(FilterNode):
    """Pass-through onto ``backing`` (the top node being committed)."""

    driver = "commit_top"
    child_name = "backing"
