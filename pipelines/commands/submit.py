"""``ddpm submit``: run any ddpm subcommand as a job on a Ray cluster, through the Ray Jobs API.

Everything after ``--`` is a ddpm command line. It becomes the job's entrypoint ``python -m pipelines.cli <args>``,
which the cluster runs on its head node with ``RAY_ADDRESS`` already pointing at the cluster, so the stage's own
``ray.init()`` joins it. The project travels with the job as its ``working_dir`` (Ray zips this checkout and
uploads it), so the cluster runs exactly the code in front of you; the cluster's image supplies the dependencies.

What the job sees, and what it never sees:

- A few non-secret settings are copied from this shell into the job's ``env_vars``: where MLflow and the object
  store are (see ``FORWARDED_ENV``).
- Credentials are never copied. The entrypoint and the runtime_env are stored by the cluster and shown in its
  dashboard, so the cluster takes credentials from its own environment (an IAM instance profile on EC2, IRSA on
  EKS; see docs/cluster.md). Flags that look like secrets and URIs with passwords are refused.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.errors import UserError

HELP = "run a ddpm subcommand as a job on a Ray cluster (Ray Jobs API), streaming its logs"

EXAMPLE = """\
example:
  # reach the cluster's dashboard without opening it to the internet
  ray dashboard ray_cluster.yaml &            # forwards http://127.0.0.1:8265 over SSH
  export MLFLOW_TRACKING_URI=http://mlflow.internal:5000
  ddpm submit -- preprocess --input s3://bucket/raw --output s3://bucket/processed --resolution 32
  ddpm submit --no-wait -- train --config configs/digits.yaml --data s3://bucket/processed \\
      --storage s3://bucket/runs --name digits-1 --register-as digits     # prints the job id and returns
  ddpm submit status raysubmit_XYZ
  ddpm submit logs raysubmit_XYZ
  ddpm submit stop raysubmit_XYZ

The address comes from --address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else http://127.0.0.1:8265.
Exit status: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED.
"""

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Non-secret settings the job needs to find the same services as this shell. Credentials stay out on purpose.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)

# Local state that must not be uploaded: Ray refuses a working_dir package over its gRPC limit (512 MiB), and a
# virtualenv or MLflow store is useless on the cluster anyway. Ray also honours .gitignore; these hold without it.
WORKING_DIR_EXCLUDES = [
    ".git/",
    ".venv/",
    "venv/",
    ".ddpm/",
    "mlruns/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
]

MANAGEMENT_COMMANDS = ("status", "logs", "stop")

# A flag whose name says it carries a secret, e.g. --aws-secret-access-key or --password=...
_SECRET_FLAG = re.compile(r"^--?[\w-]*(secret|password|passwd|token|access[-_]key|api[-_]key)[\w-]*(=.*)?$", re.I)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "ddpm submit [--address URL] [--no-wait] [--working-dir DIR] [--pip REQ ...] -- <command> [args ...]\n"
        "       ddpm submit [--address URL] {status,logs,stop} JOB_ID"
    )
    parser.add_argument(
        "--address",
        help=f"Ray dashboard URL of the cluster (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following")
    parser.add_argument(
        "--working-dir",
        type=Path,
        default=_project_root(),
        help="folder shipped to the cluster as the job's working directory (default: this project)",
    )
    parser.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQ",
        help="extra pip requirement installed for the job on every node (repeatable), e.g. --pip diffusers==0.30",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="after '--': the ddpm command to run; or one of status/logs/stop and a job id",
    )


def main(args: argparse.Namespace) -> int:
    after_separator = args.command[:1] == ["--"]
    command = args.command[1:] if after_separator else args.command
    if not after_separator and command[:1] and command[0] in MANAGEMENT_COMMANDS:
        if len(command) != 2:
            raise UserError(f"usage: ddpm submit {command[0]} JOB_ID")
        return _manage(_client(args.address), command[0], command[1])
    if not command:
        raise UserError("nothing to submit; put the ddpm command after '--', e.g. ddpm submit -- train --config ...")
    check_command(command)
    return _submit(args, command)


def check_command(ddpm_args: list[str]) -> None:
    """Parse the command to submit here, with the same parser the job will use, so that an unknown command or a
    missing flag is one line now rather than a failed job later."""
    import contextlib
    import io

    from pipelines.cli import SUBCOMMANDS, build_parser

    name = ddpm_args[0]
    if name in ("-h", "--help"):  # ddpm's own help, as a job: nothing to check
        return
    if name not in SUBCOMMANDS:
        raise UserError(f"{name!r} is not a ddpm command; choose from {', '.join(SUBCOMMANDS)}")
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            build_parser(only=name).parse_args([a for a in ddpm_args if a != "--verbose"])
    except SystemExit as exc:
        if exc.code:  # argparse's usage error; --help exits 0 and is the job's business
            message = said.getvalue().strip().splitlines()[-1] if said.getvalue().strip() else "invalid arguments"
            raise UserError(f"the command to submit is not valid: {message}") from None


def build_entrypoint(ddpm_args: list[str]) -> str:
    """The job's shell command: the ddpm CLI run by the cluster's own Python, every argument quoted."""
    for arg in ddpm_args:
        if _SECRET_FLAG.match(arg):
            flag = arg.split("=", 1)[0]
            raise UserError(
                f"refusing to put {flag} on the job's command line, which the cluster's dashboard shows; "
                "give the cluster its credentials through its environment or IAM role (docs/cluster.md)"
            )
    return shlex.join(["python", "-m", "pipelines.cli", *ddpm_args])


def build_runtime_env(working_dir: Path, pip: list[str], environ: dict[str, str]) -> dict:
    """The job's runtime_env: this project as working_dir, optional pip packages, non-secret settings."""
    if not (working_dir / "pipelines" / "cli.py").is_file():
        raise UserError(f"--working-dir {working_dir} is not a checkout of this project (no pipelines/cli.py)")
    env_vars = {}
    for name in FORWARDED_ENV:
        value = environ.get(name)
        if not value:
            continue
        if urlsplit(value).password:
            raise UserError(
                f"{name} holds a password, which the cluster's dashboard would show; "
                "configure the credentials on the cluster and pass the URI without them"
            )
        env_vars[name] = value
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def _project_root() -> Path:
    """The checkout this module was loaded from, or the current folder when the package is installed elsewhere."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def _resolve_address(address: str | None) -> str:
    return (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )


def _auth_headers() -> dict[str, str]:
    """The cluster's token from where Ray's own clients look: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.

    Ray clusters can require this token on every API (Ray's token authentication); a cluster without it ignores
    the header.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str | None):
    """A connected JobSubmissionClient; an unreachable or refusing cluster is one line that says where we looked."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = _resolve_address(address)
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its argument; pinning the former to
    # the address resolved above makes --address win, as a flag should.
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        return JobSubmissionClient(url, headers=_auth_headers())
    except ConnectionError:
        raise UserError(
            f"cannot reach the Ray Jobs API at {url}; is the cluster up and its dashboard port forwarded "
            "(ray dashboard ray_cluster.yaml)?"
        ) from None
    except AuthenticationError:
        raise UserError(
            f"the Ray cluster at {url} wants its token; set RAY_AUTH_TOKEN to the output of "
            "`ray get-auth-token` on the head node"
        ) from None


def _submit(args: argparse.Namespace, ddpm_args: list[str]) -> int:
    entrypoint = build_entrypoint(ddpm_args)
    runtime_env = build_runtime_env(args.working_dir.resolve(), args.pip, dict(os.environ))
    client = _client(args.address)
    # WORKING_DIR_EXCLUDES is the whole list; switching off Ray's built-in one (.git, .venv, ...) also silences
    # the warning Ray prints about it on every upload.
    os.environ.setdefault("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    if args.no_wait:
        print(job_id)
        return 0
    print(f"ddpm submit: job {job_id} submitted: {entrypoint}", file=sys.stderr, flush=True)
    return _follow(client, job_id)


def _follow(client, job_id: str) -> int:
    """Stream the job's logs until it ends; the exit code is 0 only if it SUCCEEDED."""
    import asyncio

    from ray.job_submission import JobStatus

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(f"ddpm submit: stopped following; job {job_id} keeps running (ddpm submit stop {job_id})",
              file=sys.stderr)
        return 130
    except RuntimeError as exc:  # the log stream broke; the job itself may be fine
        raise UserError(f"lost the log stream of job {job_id} ({exc}); check it with: ddpm submit status {job_id}")
    info = client.get_job_info(job_id)
    print(f"ddpm submit: {_summary(job_id, info)}", file=sys.stderr)
    return 0 if info.status == JobStatus.SUCCEEDED else 1


def _summary(job_id: str, info) -> str:
    """``<id> <STATUS>`` with the entrypoint's exit code, or Ray's reason when the entrypoint never ran."""
    if info.driver_exit_code is not None:
        return f"{job_id} {info.status} (exit code {info.driver_exit_code})"
    message = (info.message or "").strip().splitlines()
    return f"{job_id} {info.status}" + (f": {message[0]}" if message else "")


def _manage(client, action: str, job_id: str) -> int:
    """``status``, ``logs`` or ``stop`` of an existing job."""
    try:
        if action == "status":
            print(_summary(job_id, client.get_job_info(job_id)))
        elif action == "logs":
            sys.stdout.write(client.get_job_logs(job_id))
        else:
            stopped = client.stop_job(job_id)
            print(f"{job_id} stop requested" if stopped else f"{job_id} was not running")
    except RuntimeError as exc:  # unknown job id, or the server refused
        raise UserError(f"{action} of job {job_id} failed: {exc}") from None
    return 0
