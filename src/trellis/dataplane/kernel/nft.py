"""Apply a libnftables JSON batch with `nft -j -f -`: one transaction, all or nothing."""

from __future__ import annotations

import json
import subprocess
from typing import Any

NFT = "nft"


class NftError(Exception):
    """nft refused the batch; the kernel kept the previous ruleset."""


def apply(commands: list[dict[str, Any]]) -> None:
    batch = json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]})
    proc = subprocess.run([NFT, "-j", "-f", "-"], input=batch.encode(), capture_output=True, check=False)
    if proc.returncode != 0:
        raise NftError(f"nft refused the batch: {proc.stderr.decode(errors='replace').strip()}")
