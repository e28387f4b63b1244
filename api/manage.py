"""Administration: ``python -m api.manage migrate [--bootstrap-key]`` | ``create-key --tenant NAME`` | ``revoke-key KEY_ID``.

Every command applies the migrations first (it may be the first thing run against a fresh
database) and prints one JSON line as its last line of output.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobstore.db import migrate, session_scope
from jobstore.settings import get_settings
from jobstore.tenants import bootstrap_key, create_key, revoke_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m api.manage", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    migrate_cmd = commands.add_parser("migrate", help="Apply the database migrations (compose's one-shot migrate service).")
    migrate_cmd.add_argument(
        "--bootstrap-key", action="store_true",
        help="When the database holds no API key, create one for MASKTUNE_BOOTSTRAP_TENANT: MASKTUNE_BOOTSTRAP_API_KEY "
             "if set, else a new secret, printed this once.")
    create = commands.add_parser("create-key", help="Create an API key (and the tenant if new); prints the secret once.")
    create.add_argument("--tenant", required=True, help="Tenant name.")
    revoke = commands.add_parser("revoke-key", help="Revoke an API key by its id (key_...).")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)

    settings = get_settings()
    migrate(settings.database_url)
    with session_scope(settings.database_url) as session:
        if args.command == "migrate":
            created = bootstrap_key(session, settings.bootstrap_tenant, settings.bootstrap_api_key) if args.bootstrap_key else None
            if created is None:
                print(json.dumps({"migrated": True, "bootstrap_key": None}), flush=True)
                return 0
            key_id, secret = created
            # Printed once: a given MASKTUNE_BOOTSTRAP_API_KEY is the operator's own, so it is not echoed.
            shown = None if settings.bootstrap_api_key else secret
            print(f"Created the first API key {key_id} for tenant {settings.bootstrap_tenant!r}"
                  + (f": {secret}  (shown this once)" if shown else " from MASKTUNE_BOOTSTRAP_API_KEY"), flush=True)
            print(json.dumps({"migrated": True, "bootstrap_key": {"key_id": key_id, "tenant": settings.bootstrap_tenant,
                                                                 "secret": shown}}), flush=True)
            return 0
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
