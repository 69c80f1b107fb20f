"""User-facing errors: one clear line (which file, what is wrong, what to do)."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints `error: <message>` and exits 1 (traceback only
    under --debug). Messages name the file or key, the problem and the fix."""


class ShardError(UserError):
    """A token shard or dataset manifest that cannot be trusted."""
