"""Administration: ``python -m api.manage create-key --tenant NAME`` | ``revoke-key KEY_ID``.

Applies migrations first (it may be the first thing run against a fresh database), and
prints one JSON line as its last line of output.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobstore.db import migrate, session_scope
from jobstore.settings import get_settings
from jobstore.tenants import create_key, revoke_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.manage", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-key", help="Create an API key (and the tenant if new); prints the secret once.")
    create.add_argument("--tenant", required=True, help="Tenant name.")
    revoke = commands.add_parser("revoke-key", help="Revoke an API key by its id (key_...).")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)

    settings = get_settings()
    migrate(settings.database_url)
    with session_scope(settings.database_url) as session:
        if args.command == "create-key":
            name = args.tenant.strip()
            if not name or len(name) > 200:
                parser.error("--tenant must be 1..200 characters")
            key_id, secret = create_key(session, name)
            print(json.dumps({"key_id": key_id, "tenant": name, "secret": secret}), flush=True)
            return 0
        revoked = revoke_key(session, args.key_id)
    print(json.dumps({"key_id": args.key_id, "revoked": revoked}), flush=True)
    if not revoked:
        print(f"no live key with id {args.key_id!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
