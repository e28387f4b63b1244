import secrets


def new_id(prefix: str) -> str:
    """Public ids carry their type: ds_..., mdl_..., job_..., key_..."""
    return f"{prefix}_{secrets.token_hex(10)}"
