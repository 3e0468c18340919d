# SPDX-License-Identifier: Apache-2.0 OR MIT
"""dnf integration of dnfimage (a dnf 4 plugin).

`dnf image ARGS...` runs `dnf-image ARGS...` and exits with its status, on any host.

On a host booted from an image (`/run/ostree-booted`, and `dnf-image status` shows the booted
deployment following an image), dnf's commands that would write /usr are turned into
dnfimage's: `dnf upgrade` without arguments runs `dnf-image upgrade`, `dnf install PKG...`
layers with `dnf-image install PKG...`, `dnf remove PKG...` of layered packages runs
`dnf-image uninstall PKG...`; every other change to the installed packages is refused with a
sentence saying what to do instead. Read-only commands (list, info, search, repoquery,
makecache, check-update...) are left alone, and on any other host the plugin changes nothing.

The plugin is a thin client of the `dnf-image` command line (found on PATH, as a user would run
it): dnfimage's services do the work.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import dnf
import dnf.cli
import dnf.exceptions

DNF_IMAGE = "dnf-image"
# Exists on every host booted through ostree (written by ostree-prepare-root).
OSTREE_BOOTED = "/run/ostree-booted"

# What to do instead of a dnf command that would write /usr on an image host, by command.
INSTEAD = {
    "upgrade": "On an image host packages are upgraded with the image: run `dnf upgrade` "
    "without arguments (it runs `dnf image upgrade`).",
    "upgrade-minimal": "On an image host packages are upgraded with the image: run "
    "`dnf upgrade` without arguments (it runs `dnf image upgrade`).",
    "downgrade": "An image host cannot downgrade packages in place: `dnf image rollback` "
    "boots the previous deployment again, `dnf image override replace FILE.rpm` puts another "
    "version of an image package in place.",
    "reinstall": "An image host cannot reinstall packages: /usr is the image's, read-only, and "
    "`dnf image reset` brings the image back as built, without layered packages.",
    "distro-sync": "On an image host the image decides the package versions: `dnf upgrade` "
    "moves to the newest image, `dnf image rebase IMAGE` to another one.",
    "swap": "An image host cannot swap packages in place: remove the image's with "
    "`dnf image override remove PKG` and layer the other with `dnf install PKG`.",
    "autoremove": "On an image host only layered packages can be removed: `dnf remove PKG` "
    "uninstalls one, `dnf image reset` drops them all.",
    "shell": "dnf's shell cannot change an image host: use `dnf install`, `dnf remove`, "
    "`dnf upgrade` or `dnf image ...` one command at a time.",
    "group": "Package groups cannot be layered on an image host: layer their packages by name "
    "with `dnf install PKG...`.",
    "module": "Modules cannot be changed on an image host: the image decides its streams; "
    "layer packages by name with `dnf install PKG...`.",
    "history": "dnf's history cannot be undone on an image host: `dnf image rollback` boots "
    "the previous deployment again.",
    "install-files": "Local RPM files cannot be layered on an image host: "
    "`dnf image override replace FILE.rpm` replaces an image package with one.",
    "install-groups": "Package groups and modules cannot be layered on an image host: layer "
    "packages by name with `dnf install PKG...`.",
    "remove-options": "On an image host `dnf remove` uninstalls layered packages by name only: "
    "`dnf image status` lists them.",
    "other": "dnf cannot change the packages of an image host: `dnf install` and `dnf remove` "
    "layer packages, `dnf upgrade` fetches the next image, `dnf image --help` lists the rest.",
}

# Subcommands that change packages, for the commands that also have read-only ones.
WRITING_SUBCOMMANDS = {
    "group": {"install", "remove", "erase", "upgrade", "update"},
    "module": {"install", "update", "remove", "erase", "switch-to"},
    "history": {"undo", "redo", "rollback", "replay"},
}
GROUP_DIRECT = {
    "groupinstall": "install",
    "groupupdate": "install",
    "groupremove": "remove",
    "grouperase": "remove",
}


def run_dnf_image(args):
    """Runs dnf-image with `args` in the foreground and exits with its status."""
    exe = shutil.which(DNF_IMAGE)
    if exe is None:
        raise dnf.exceptions.Error(
            "dnf-image is not installed (not found on PATH); it does what `dnf image` asks."
        )
    sys.stdout.flush()
    sys.stderr.flush()
    # Ctrl-C goes to dnf-image (same process group), which cancels the service's job and
    # exits; dnf waits for that instead of dying first.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = subprocess.Popen(
            [exe] + list(args),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.exit(code if code >= 0 else 128 - code)


def command_index(parser, args):
    """The index in `args` of dnf's command word: the first argument that is neither one of
    dnf's options nor the value of one."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return i + 1 if i + 1 < len(args) else None
        if arg.startswith("-") and len(arg) > 1:
            action = parser._option_string_actions.get(arg.split("=", 1)[0])
            takes_value = action is not None and action.nargs != 0 and "=" not in arg
            i += 2 if takes_value else 1
            continue
        return i
    return None


class ImageCommand(dnf.cli.Command):
    """`dnf image ARGS...`: `dnf-image ARGS...`."""

    aliases = ("image",)
    summary = "manage the image this host boots (dnf-image; `dnf image --help` lists its commands)"

    def __init__(self, cli):
        super().__init__(cli)
        # Everything after `image` is dnf-image's, options included (`--help`, `--repo`): it
        # runs before dnf reads them as its own (dnf would print its help for `--help`, or
        # configure repositories for `--repo`). dnf also makes a command to print its help
        # (`dnf help image`); then the command word is not this one and nothing runs.
        args = list(getattr(cli.base, "args", None) or [])
        i = command_index(cli.optparser, args)
        if i is not None and args[i] in self.aliases:
            run_dnf_image(args[i + 1 :])

    def run(self):
        run_dnf_image([])


class DelegateCommand(dnf.cli.Command):
    """Stands in for a dnf command that dnf-image does on an image host."""

    aliases = ("image",)

    def __init__(self, cli, args):
        super().__init__(cli)
        self.args = args

    def run(self):
        run_dnf_image(self.args)


class DnfImage(dnf.Plugin):
    name = "dnfimage"

    def __init__(self, base, cli):
        super().__init__(base, cli)
        self.cli = cli
        self._deployment = None
        if cli is not None:
            cli.register_command(ImageCommand)

    def config(self):
        """Turns dnf's command into dnfimage's, or refuses it, on an image host."""
        if self.cli is None or self.cli.command is None:
            return
        command = self.cli.command
        name = command._basecmd
        opts = command.opts
        if name not in ("install", "remove") and name not in INSTEAD:
            return
        if not self._applies():
            return
        if name in WRITING_SUBCOMMANDS and not self._writes(name, opts):
            return
        deployment = self._image_deployment()
        if deployment is None:
            return
        specs = list(getattr(opts, "pkg_specs", None) or [])
        groups = list(getattr(opts, "grp_specs", None) or [])
        files = list(getattr(opts, "filenames", None) or [])

        if name == "upgrade" and not (specs or groups or files):
            args = ["upgrade"]
            if self.base.conf.downloadonly:
                args.append("--download-only")
            self.cli.command = DelegateCommand(self.cli, args)
        elif name == "install":
            if files:
                raise dnf.exceptions.Error(INSTEAD["install-files"])
            if groups:
                raise dnf.exceptions.Error(INSTEAD["install-groups"])
            args = ["install"]
            for repo in getattr(opts, "repo", None) or []:
                args += ["--repo", repo]
            self.cli.command = DelegateCommand(self.cli, args + ["--"] + specs)
        elif name == "remove":
            if groups or files or getattr(opts, "duplicated", False) or getattr(
                opts, "oldinstallonly", False
            ):
                raise dnf.exceptions.Error(INSTEAD["remove-options"])
            layered = set(deployment.get("layering", {}).get("packages", []))
            for spec in specs:
                if spec not in layered:
                    raise dnf.exceptions.Error(
                        "{0} is not a layered package: packages that come with the image are "
                        "removed with `dnf image override remove {0}`.".format(spec)
                    )
            self.cli.command = DelegateCommand(self.cli, ["uninstall", "--"] + specs)
        else:
            raise dnf.exceptions.Error(INSTEAD[name])

    def resolved(self):
        """Any other command that would change packages on an image host (one of another
        plugin, `repository-packages ...`) stops here, before anything is downloaded."""
        if not self._applies() or not self.base.transaction:
            return
        if self._image_deployment() is not None:
            raise dnf.exceptions.Error(INSTEAD["other"])

    def _applies(self):
        """Whether this could be an image host: booted through ostree, and dnf works on its
        root (not on another one with --installroot)."""
        return os.path.exists(OSTREE_BOOTED) and os.path.realpath(
            self.base.conf.installroot
        ) == "/"

    @staticmethod
    def _writes(name, opts):
        """Whether a command with subcommands changes packages."""
        if name == "group":
            sub = GROUP_DIRECT.get(getattr(opts, "command", None)) or getattr(
                opts, "subcmd", None
            )
        elif name == "module":
            sub = (getattr(opts, "subcmd", None) or [None])[0]
        else:
            sub = getattr(opts, "transactions_action", None)
        return sub in WRITING_SUBCOMMANDS[name]

    def _image_deployment(self):
        """The booted deployment (else the one that boots next) as `dnf-image status --json`
        shows it, when it follows an image; else None. Asked once."""
        if self._deployment is not None:
            return self._deployment or None
        self._deployment = {}
        exe = shutil.which(DNF_IMAGE)
        if exe is None:
            return None
        try:
            out = subprocess.run(
                [exe, "status", "--json"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=True,
                universal_newlines=True,
            )
            deployments = json.loads(out.stdout)["deployments"]
        except (OSError, ValueError, KeyError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            raise dnf.exceptions.Error(
                "This host is booted through ostree, and `dnf-image status` cannot say whether "
                "from an image: {}".format(detail.strip())
            )
        by_role = [d for d in deployments if d.get("booted")] or [
            d for d in deployments if d.get("default")
        ]
        current = by_role[0] if by_role else None
        if current is None or not current.get("image"):
            return None
        # Layered packages: those of the deployment the next change starts from.
        staged = [d for d in deployments if d.get("staged")]
        self._deployment = dict(current, layering=(staged or [current])[0].get("layering", {}))
        return self._deployment
