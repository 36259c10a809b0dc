"""Static checks of the Docker images and cluster launch scripts (issue 7).

No Docker engine is needed (nor used): the Dockerfiles are parsed here and
checked against the repository and pyproject.toml; the shell scripts are
syntax-checked with ``bash -n`` and exercised with stub ``deepspeed``,
``srun`` and ``scontrol`` commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
GPU_DOCKERFILE = DOCKER / "Dockerfile"
CPU_DOCKERFILE = DOCKER / "Dockerfile.cpu"
ENTRYPOINT = DOCKER / "entrypoint.sh"
SBATCH = ROOT / "launcher" / "slurm_pretrain.sbatch"
DEPS_HELPER = DOCKER / "pyproject_deps.py"
INSTALL = DOCKER / "install.sh"  # the build steps both images share

# torch version the project's test suite runs with; the CPU image pins it.
TESTED_TORCH_VERSION = "2.13.0"

# torch requirements of the compiled GPU packages, read from their sdists
# (`pip download --no-deps megablocks==0.10.0`, PKG-INFO / setup.py /
# pyproject.toml).  If pyproject.toml moves to another version, look the new
# one up and extend this table: the test fails until then.
TORCH_REQUIREMENTS = {
    # install_requires and [build-system].requires
    ("megablocks", "0.10.0"): ">=2.7.0,<2.7.1",
    # no runtime torch requirement; [build-system].requires (ABI of the build)
    ("grouped-gemm", "0.3.0"): ">=2.7.0,<2.8",
}

# Packages each image must pin explicitly (they are installed in dedicated
# layers, not from the pyproject-derived requirements file).
REQUIRED_PINS = {
    GPU_DOCKERFILE: {"deepspeed", "megablocks", "grouped-gemm"},
    CPU_DOCKERFILE: {"deepspeed", "torch"},
}


# ---------------------------------------------------------------------------
# A small Dockerfile parser: parser directives, comments, line continuations,
# ARG substitution, stages.  Heredocs are not supported (and not used).
# ---------------------------------------------------------------------------


@dataclass
class Instruction:
    cmd: str  # upper-case keyword
    value: str  # raw text after the keyword, continuations joined
    lineno: int  # first line (1-based)

    def json_args(self) -> list[str] | None:
        """The exec (JSON array) form's arguments, or None for shell form."""
        text = self.value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                return None
            if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
                return parsed
        return None


@dataclass
class Stage:
    index: int
    base: str
    name: str | None
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Instruction]:
    lines = text.splitlines()
    escape = "\\"
    i = 0
    # Parser directives: only at the very top, `# directive=value`.
    while i < len(lines):
        m = re.match(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$", lines[i])
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
        i += 1

    instructions: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for lineno in range(i, len(lines)):
        line = lines[lineno]
        stripped = line.strip()
        if stripped.startswith("#"):
            continue  # comments are dropped, even inside a continuation
        if not buf:
            if not stripped:
                continue
            start = lineno + 1
        elif not stripped:
            continue  # empty lines inside a continuation are allowed
        rstripped = line.rstrip()
        if rstripped.endswith(escape):
            buf.append(rstripped[: -len(escape)])
            continue
        buf.append(line)
        joined = " ".join(part.strip() for part in buf).strip()
        buf = []
        keyword, _, value = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    if buf:
        raise ValueError("dangling line continuation at end of Dockerfile")
    return instructions


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def substitute(text: str, env: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(4)
        value = env.get(name)
        op, word = m.group(2), m.group(3)
        if op == "-":
            return value if value else word
        if op == "+":
            return word if value else ""
        return value if value is not None else m.group(0)

    return _VAR.sub(repl, text)


def _parse_arg(value: str) -> tuple[str, str | None]:
    name, eq, default = value.partition("=")
    if not eq:
        return name.strip(), None
    default = default.strip()
    if len(default) >= 2 and default[0] == default[-1] and default[0] in "'\"":
        default = default[1:-1]
    return name.strip(), default


def split_stages(instructions: list[Instruction]) -> list[Stage]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "ARG" and not stages:
            name, default = _parse_arg(ins.value)
            global_args[name] = default or ""
        elif ins.cmd == "FROM":
            words = [w for w in ins.value.split() if not w.startswith("--platform")]
            base = substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(len(stages), base, name))
        elif not stages:
            raise ValueError(f"line {ins.lineno}: {ins.cmd} before the first FROM")
        else:
            stage = stages[-1]
            if ins.cmd == "ARG":
                name, default = _parse_arg(ins.value)
                if default is None:
                    default = global_args.get(name, "")
                stage.args[name] = substitute(default, stage.args)
            stage.instructions.append(ins)
    return stages


def copy_spec(ins: Instruction, env: dict[str, str]) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD instruction."""
    args = ins.json_args()
    if args is None:
        args = shlex.split(ins.value)
    flags: dict[str, str] = {}
    rest = []
    for arg in args:
        if arg.startswith("--") and not rest:
            key, _, val = arg[2:].partition("=")
            flags[key] = val
        else:
            rest.append(substitute(arg, env))
    if len(rest) < 2:
        raise ValueError(f"line {ins.lineno}: {ins.cmd} needs a source and a destination")
    return flags, rest[:-1], rest[-1]


def stage_env(stage: Stage, upto: Instruction | None = None) -> dict[str, str]:
    """ARG and ENV values visible in a stage (ENV parsed in its key=value form)."""
    env: dict[str, str] = {}
    for ins in stage.instructions:
        if ins is upto:
            break
        if ins.cmd == "ARG":
            name, default = _parse_arg(ins.value)
            env[name] = stage.args.get(name, default or "")
        elif ins.cmd == "ENV":
            for token in shlex.split(ins.value):
                if "=" in token:
                    key, _, val = token.partition("=")
                    env[key] = substitute(val, env)
    return env


def load(path: Path) -> list[Stage]:
    return split_stages(parse_dockerfile(path.read_text()))


_INSTALL_CALL = re.compile(r"/tmp/build/install\.sh (\S+)((?: (?!&&)\S+)*)")


def install_steps(stage: Stage) -> list[tuple[int, str, list[str]]]:
    """(instruction index, step, arguments) of every `install.sh STEP ARGS...` the stage RUNs."""
    return [(n, m.group(1), shlex.split(substitute(m.group(2), stage_env(stage, ins))))
            for n, ins in enumerate(stage.instructions) if ins.cmd == "RUN"
            for m in _INSTALL_CALL.finditer(ins.value)]


def install_step_body(step: str, args: list[str]) -> str:
    """The shell text of one install.sh step, its constants and positional argument filled in."""
    text = INSTALL.read_text()
    m = re.search(rf"^    {re.escape(step)}\)\n(.*?)^        ;;", text, re.M | re.S)
    assert m, f"install.sh has no step {step!r}"
    body = m.group(1)
    for name, value in re.findall(r"^([A-Z_]+)=(/\S+)$", text, re.M):
        body = body.replace(f"${{{name}}}", value)
    return re.sub(r"\$\{?1(?::\?\w+)?\}?", args[0], body) if args else body


def run_text(stage: Stage, ins: Instruction) -> str:
    """A RUN's shell text with every install.sh step it calls spelled out, ARGs and ENVs substituted."""
    env = stage_env(stage, ins)
    text = _INSTALL_CALL.sub(lambda m: install_step_body(m.group(1), shlex.split(substitute(m.group(2), env))),
                             ins.value)
    return substitute(text, env)


def pinned_versions(stages: list[Stage]) -> dict[str, set[str]]:
    """name -> versions of every `name==version` in RUN instructions."""
    pins: dict[str, set[str]] = {}
    for stage in stages:
        for ins in stage.instructions:
            if ins.cmd != "RUN":
                continue
            text = substitute(ins.value, stage_env(stage, ins))
            unresolved = re.search(r"==\s*\$\{?\w+", text)
            if unresolved:
                raise ValueError(f"line {ins.lineno}: undefined ARG in pin {unresolved.group(0)!r}")
            for m in re.finditer(r"(?<![\w.=<>!~-])([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!_-]*)", text):
                pins.setdefault(canonicalize_name(m.group(1)), set()).add(m.group(2))
    return pins


# ---------------------------------------------------------------------------
# .dockerignore (Docker semantics: patterns relative to the context root,
# `**` spans directories, a matched directory excludes everything below it,
# later `!pattern` lines re-include).
# ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i)
            if j == -1:
                out.append(re.escape(c))
            else:
                out.append(pattern[i : j + 1].replace("[!", "[^"))
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def load_dockerignore(path: Path) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def is_ignored(relpath: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    parts = Path(relpath).as_posix().split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


@pytest.fixture(scope="module")
def project_requirements(pyproject) -> dict[str, Requirement]:
    reqs = list(pyproject["dependencies"])
    for extra in pyproject.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


@pytest.fixture(scope="module")
def ignore_rules() -> list[tuple[bool, re.Pattern]]:
    return load_dockerignore(ROOT / ".dockerignore")


DOCKERFILES = [GPU_DOCKERFILE, CPU_DOCKERFILE]
ids = [p.name for p in DOCKERFILES]


# ---------------------------------------------------------------------------
# the parser itself
# ---------------------------------------------------------------------------


def test_parser_handles_continuations_comments_and_flags():
    text = """# syntax=docker/dockerfile:1
ARG BASE=python:3.11-slim
ARG PKG_VERSION=1.2.3
FROM ${BASE} AS build
# a comment
ARG PKG_VERSION
RUN echo one \\
    # comment inside a continuation
    && pip install "pkg==${PKG_VERSION}" \\

    && echo done
FROM ${BASE}
ARG PKG_VERSION
COPY --chown=app:app --chmod=0644 a.txt b/ /dst/
COPY --from=build /wheels /tmp/wheels
COPY ["x y.txt", "/opt/"]
USER app
ENTRYPOINT ["/bin/sh", "-c"]
"""
    stages = split_stages(parse_dockerfile(text))
    assert [s.base for s in stages] == ["python:3.11-slim", "python:3.11-slim"]
    assert stages[0].name == "build" and stages[1].name is None
    run = stages[0].instructions[1]
    assert run.cmd == "RUN" and "comment" not in run.value and run.value.endswith("&& echo done")
    assert pinned_versions(stages) == {"pkg": {"1.2.3"}}
    assert stages[1].args == {"PKG_VERSION": "1.2.3"}
    copies = [i for i in stages[1].instructions if i.cmd == "COPY"]
    flags, srcs, dst = copy_spec(copies[0], {})
    assert flags == {"chown": "app:app", "chmod": "0644"} and srcs == ["a.txt", "b/"] and dst == "/dst/"
    assert copy_spec(copies[1], {})[0] == {"from": "build"}
    assert copy_spec(copies[2], {})[1:] == (["x y.txt"], "/opt/")
    assert stages[1].instructions[-1].json_args() == ["/bin/sh", "-c"]
    # a global ARG is not visible in a stage that does not redeclare it
    with pytest.raises(ValueError, match="undefined ARG"):
        pinned_versions(split_stages(parse_dockerfile("ARG V=1\nFROM x\nRUN pip install y==${V}\n")))


def test_dockerignore_semantics():
    rules = [(False, _pattern_regex("runs")), (False, _pattern_regex("**/__pycache__")),
             (False, _pattern_regex("**/*.pt")), (True, _pattern_regex("keep.pt"))]
    assert is_ignored("runs/x/ckpt", rules)
    assert not is_ignored("camex_ds/runs.py", rules)
    assert is_ignored("camex_ds/moe/__pycache__/x.pyc", rules)
    assert is_ignored("a/b/model.pt", rules) and not is_ignored("keep.pt", rules)
    data_rule = [(False, _pattern_regex("data"))]
    assert is_ignored("data/corpus.txt", data_rule)
    assert not is_ignored("camex_ds/data/corpus.py", data_rule)


# ---------------------------------------------------------------------------
# the Dockerfiles
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_copy_sources_exist_in_context(dockerfile, ignore_rules):
    stages = load(dockerfile)
    names = {s.name for s in stages if s.name} | {str(s.index) for s in stages}
    checked = 0
    for stage in stages:
        for ins in stage.instructions:
            if ins.cmd not in ("COPY", "ADD"):
                continue
            flags, sources, _ = copy_spec(ins, stage_env(stage, ins))
            if "from" in flags:
                assert flags["from"] in names or ":" in flags["from"], f"line {ins.lineno}: unknown stage"
                continue  # copies out of another stage/image, not the context
            for src in sources:
                assert not re.match(r"^[a-z]+://", src), f"line {ins.lineno}: use COPY, not remote ADD"
                rel = os.path.normpath(src)
                assert not rel.startswith(".."), f"line {ins.lineno}: {src} escapes the build context"
                matches = list(ROOT.glob(rel)) if rel != "." else [ROOT]
                assert matches, f"{dockerfile.name}:{ins.lineno}: COPY source {src!r} not in the repo"
                if rel != ".":
                    for m in matches:
                        r = m.relative_to(ROOT).as_posix()
                        assert not is_ignored(r, ignore_rules), f"{src!r} is excluded by .dockerignore"
                checked += 1
    assert checked >= 2


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_pins_agree_with_pyproject(dockerfile, project_requirements):
    pins = pinned_versions(load(dockerfile))
    missing = REQUIRED_PINS[dockerfile] - set(pins)
    assert not missing, f"{dockerfile.name} does not pin {missing}"
    for name, versions in pins.items():
        assert len(versions) == 1, f"{dockerfile.name} pins {name} to several versions: {versions}"
        req = project_requirements.get(name)
        if req is None:
            continue  # build tooling etc., not a project dependency
        (version,) = versions
        if any(spec.operator == "==" for spec in req.specifier):
            assert str(req.specifier) == f"=={version}", (
                f"{dockerfile.name} pins {name}=={version}, pyproject.toml says {req}")
        assert req.specifier.contains(version, prereleases=True), (
            f"{dockerfile.name}: {name}=={version} does not satisfy pyproject's {req}")


def test_cpu_image_uses_tested_torch(project_requirements):
    pins = pinned_versions(load(CPU_DOCKERFILE))
    assert pins["torch"] == {TESTED_TORCH_VERSION}
    assert project_requirements["torch"].specifier.contains(TESTED_TORCH_VERSION)
    text = CPU_DOCKERFILE.read_text()
    assert "download.pytorch.org/whl/cpu" in text, "the CPU image must install the CPU-only torch wheel"
    assert "megablocks" not in pins and "grouped-gemm" not in pins


def _base_torch_version(base: str) -> str:
    m = re.fullmatch(r"(?:docker\.io/)?pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-(?:devel|runtime)", base)
    assert m, f"GPU base image {base!r} is not a pytorch/pytorch:<ver>-cuda<x>-cudnn<y>-<flavour> tag"
    return m.group(1)


def test_gpu_base_torch_satisfies_all_requirements(project_requirements):
    stages = load(GPU_DOCKERFILE)
    bases = {s.base for s in stages}
    assert len(bases) == 1, f"all stages must share the base image (ABI of the built wheels): {bases}"
    (base,) = bases
    assert base.endswith("-devel"), "the GPU image compiles CUDA extensions: it needs the devel image"
    torch_version = _base_torch_version(base)
    assert project_requirements["torch"].specifier.contains(torch_version)
    for pkg in ("megablocks", "grouped-gemm"):
        pinned = str(project_requirements[pkg].specifier).removeprefix("==")
        key = (pkg, pinned)
        assert key in TORCH_REQUIREMENTS, (
            f"pyproject pins {pkg}=={pinned}: look up its torch requirement and add it to TORCH_REQUIREMENTS")
        spec = SpecifierSet(TORCH_REQUIREMENTS[key])
        assert spec.contains(torch_version), (
            f"base image torch {torch_version} does not satisfy {pkg}=={pinned}'s torch{spec}")
    # pip must never replace the base torch, and the extensions must be built against it
    text = GPU_DOCKERFILE.read_text()
    assert "PIP_CONSTRAINT" in text and "pyproject_deps.py constraints" in text
    for ins in (i for s in stages for i in s.instructions if i.cmd == "RUN"):
        if re.search(r"pip (?:wheel|install)[^&]*(?:megablocks|grouped_gemm|deepspeed)==", ins.value):
            assert "--no-build-isolation" in ins.value, f"line {ins.lineno}: build against the base torch"
    assert "TORCH_CUDA_ARCH_LIST" in text and "DS_ACCELERATOR=cuda" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_pip_constraint_file_exists_before_it_is_used(dockerfile):
    """PIP_CONSTRAINT pointing at a missing file makes every later pip call fail."""
    for stage in load(dockerfile):
        for n, ins in enumerate(stage.instructions):
            if ins.cmd != "ENV":
                continue
            m = re.search(r"PIP_CONSTRAINT=(\S+)", ins.value)
            if not m:
                continue
            path = m.group(1)
            writers = [k for k, i in enumerate(stage.instructions[:n])
                       if i.cmd == "RUN" and re.search(rf'>\s*"?{re.escape(path)}"?(?:\s|$)', run_text(stage, i))]
            assert writers, f"{dockerfile.name}:{ins.lineno}: PIP_CONSTRAINT={path} set before the file is written"


def test_gpu_image_prebuilds_deepspeed_ops_and_has_multinode_tools():
    text = GPU_DOCKERFILE.read_text()
    for var in ("DS_BUILD_FUSED_ADAM=1", "DS_BUILD_UTILS=1"):
        assert var in text
    # CPU Adam is built with -march=native: opt-in only (see the Dockerfile)
    wheels = load(GPU_DOCKERFILE)[0]
    assert wheels.args.get("DS_BUILD_CPU_ADAM") == "0" and 'DS_BUILD_CPU_ADAM="${DS_BUILD_CPU_ADAM}"' in text
    m = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', text)
    assert m and {"8.0", "9.0"} <= {a.split("+")[0] for a in m.group(1).split(";")}
    final = load(GPU_DOCKERFILE)[-1]
    apt = " ".join(run_text(final, i) for i in final.instructions if i.cmd == "RUN")
    apt = apt[apt.index("apt-get install"):]
    for pkg in ("pdsh", "openssh-server", "openssh-client"):
        assert re.search(rf"\b{pkg}\b", apt), f"{pkg} missing from the GPU image"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_dependency_layers_come_before_the_source(dockerfile):
    final = load(dockerfile)[-1]
    copies = [(n, copy_spec(i, {})) for n, i in enumerate(final.instructions) if i.cmd == "COPY"]
    whole = [n for n, (flags, srcs, _) in copies if "from" not in flags and "." in srcs]
    deps = [n for n, (flags, srcs, _) in copies if "from" not in flags and "pyproject.toml" in srcs]
    assert len(whole) == 1, "the source is copied once, whole (COPY . <dir>)"
    assert deps and deps[0] < whole[0], "pyproject.toml must be copied (and its deps installed) before the source"
    installs = [n for n, i in enumerate(final.instructions)
                if i.cmd == "RUN" and re.search(r'pyproject_deps\.py"? requirements', run_text(final, i))]
    assert installs and deps[0] < installs[0] < whole[0]
    after = [run_text(final, i) for i in final.instructions[whole[0]:] if i.cmd == "RUN"]
    assert any(re.search(r'pip install --no-deps "?/opt/camex_ds\b', text) for text in after)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_final_stage_runs_as_non_root(dockerfile):
    final = load(dockerfile)[-1]
    users = [i for i in final.instructions if i.cmd == "USER"]
    assert users, "the final stage must set USER"
    user = substitute(users[-1].value.strip(), stage_env(final, users[-1])).split(":")[0]
    assert user and "$" not in user, f"USER {users[-1].value!r} does not resolve"
    assert user not in ("root", "0"), f"final USER is {user!r}"
    creates = [run_text(final, i) for i in final.instructions if i.cmd == "RUN" and "useradd" in run_text(final, i)]
    if user.isdigit():
        pattern = rf"useradd\b.*--uid[= ]\"?{user}\"?(?:\s|$)"
    else:
        pattern = rf"useradd\b.*\b{re.escape(user)}\b"
    assert any(re.search(pattern, c) for c in creates), f"user {user!r} is never created"


def test_both_images_share_the_install_steps():
    """The steps of docker/install.sh, in the same order in both images: the CPU build, which the cluster tests
    run for real, exercises everything the GPU image does besides its compiled wheels."""
    steps = {f.name: [step for _, step, _ in install_steps(load(f)[-1])] for f in DOCKERFILES}
    assert steps["Dockerfile"] == steps["Dockerfile.cpu"] == ["system", "pin-torch", "dependencies", "user",
                                                              "project"], steps
    extras = {f.name: {step: args for _, step, args in install_steps(load(f)[-1])} for f in DOCKERFILES}
    assert extras["Dockerfile"]["project"] == extras["Dockerfile"]["dependencies"] == ["gpu"]
    assert extras["Dockerfile.cpu"]["project"] == extras["Dockerfile.cpu"]["dependencies"] == ["test"]
    assert os.access(INSTALL, os.X_OK) and INSTALL.read_text().startswith("#!")


def _entrypoint_source(dockerfile: Path) -> tuple[list[str], Path]:
    final = load(dockerfile)[-1]
    entries = [i for i in final.instructions if i.cmd == "ENTRYPOINT"]
    assert entries, f"{dockerfile.name}: no ENTRYPOINT in the final stage"
    argv = entries[-1].json_args()
    assert argv, "ENTRYPOINT must use the exec (JSON) form so that signals reach the launcher"
    target = argv[0]
    # map the in-image path back to the repository through the stage's COPYs
    for ins in reversed(final.instructions):
        if ins.cmd not in ("COPY", "ADD"):
            continue
        flags, sources, dest = copy_spec(ins, stage_env(final, ins))
        if "from" in flags:
            continue
        dest = dest.rstrip("/") or "/"
        if target == dest and len(sources) == 1:
            return argv, ROOT / sources[0]
        if target.startswith(dest + "/") and len(sources) == 1 and (ROOT / sources[0]).is_dir():
            return argv, ROOT / sources[0] / target[len(dest) + 1:]
    pytest.fail(f"{dockerfile.name}: ENTRYPOINT {target} is not copied from the repository")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_entrypoint_is_a_repo_script_running_deepspeed_pretrain(dockerfile):
    _, script = _entrypoint_source(dockerfile)
    assert script.resolve() == ENTRYPOINT.resolve()
    assert script.is_file()
    assert script.read_text().startswith("#!"), "entrypoint needs a shebang"
    assert os.access(script, os.X_OK), "entrypoint must be executable (git mode 100755)"
    code = [ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#")]
    body = "\n".join(code)
    assert re.search(r"\bexec deepspeed\b", body), "entrypoint must exec the deepspeed launcher"
    assert "launcher/pretrain.py" in body


def _bash() -> str:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    return bash


@pytest.mark.parametrize("script", [ENTRYPOINT, SBATCH, INSTALL, DOCKER / "debian_base.sh"],
                         ids=["entrypoint.sh", "slurm_pretrain.sbatch", "install.sh", "debian_base.sh"])
def test_shell_scripts_parse(script):
    result = subprocess.run([_bash(), "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _stub(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


_ECHO_ARGS = 'for a in "$@"; do printf "<%s>" "$a"; done; echo\n'


def test_entrypoint_argument_handling(tmp_path):
    bash = _bash()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _stub(bindir, "deepspeed", 'printf "deepspeed"; ' + _ECHO_ARGS)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "CAMEX_HOME": "/opt/camex_ds",
           "SSH_KEY_DIR": str(tmp_path / "no-keys"), "HOME": str(tmp_path)}
    env.pop("DS_LAUNCHER_ARGS", None)

    def run(*args, **extra):
        r = subprocess.run([bash, str(ENTRYPOINT), *args], capture_output=True, text=True, env={**env, **extra})
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    pretrain = "</opt/camex_ds/launcher/pretrain.py>"
    assert run("--max_steps", "5", "--data", "a b") == f"deepspeed{pretrain}<--max_steps><5><--data><a b>"
    assert run("--num_gpus", "8", "--", "--seed", "1") == f"deepspeed<--num_gpus><8>{pretrain}<--seed><1>"
    assert run("--seed", "1", DS_LAUNCHER_ARGS="--hostfile /h") == f"deepspeed<--hostfile></h>{pretrain}<--seed><1>"
    # a pdsh launch (--hostfile, ssh) starts sshd first; without keys it says so and launches anyway
    r = subprocess.run([bash, str(ENTRYPOINT), "--hostfile", "/h", "--", "--seed", "1"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == f"deepspeed<--hostfile></h>{pretrain}<--seed><1>"
    assert "entrypoint: " in r.stderr and ("authorized_keys" in r.stderr or "not found" in r.stderr)
    assert run("echo", "plain command") == "plain command"


def test_entrypoint_installs_ssh_keys(tmp_path):
    bash = _bash()
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "id_ed25519").write_text("PRIVATE\n")
    (keys / "id_ed25519.pub").write_text("ssh-ed25519 AAAA test\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "SSH_KEY_DIR": str(keys)}
    r = subprocess.run([bash, str(ENTRYPOINT), "true"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    ssh = home / ".ssh"
    assert (ssh / "id_ed25519").read_text() == "PRIVATE\n"
    assert (ssh / "authorized_keys").read_text() == "ssh-ed25519 AAAA test\n"
    assert (ssh / "id_ed25519").stat().st_mode & 0o777 == 0o600
    assert ssh.stat().st_mode & 0o777 == 0o700


def test_slurm_script_launches_one_deepspeed_per_node(tmp_path):
    bash = _bash()
    text = SBATCH.read_text()
    for needle in ("scontrol show hostnames", "--no_ssh", "--node_rank", "SLURM_NODEID", "--master_addr",
                   "launcher/pretrain.py", "--ntasks-per-node=1"):
        assert needle in text, needle
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _stub(bindir, "scontrol", 'printf "gpu-a01\\ngpu-a02\\n"\n')
    # srun stub: drop srun's options, run the task once per node
    _stub(bindir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                          'for n in 0 1; do SLURM_NODEID=$n "$@" || exit 1; done\n')
    _stub(bindir, "deepspeed", 'printf "node%s:" "$SLURM_NODEID"; tr "\\n" "|" < "$2"; ' + _ECHO_ARGS)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-a[01-02]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_GPUS_ON_NODE": "4", "TMPDIR": str(tmp_path)}
    for var in ("CAMEX_IMAGE", "CAMEX_HOME", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE"):
        env.pop(var, None)
    r = subprocess.run([bash, str(SBATCH), "--output_dir", "/shared/runs/x y"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("node")]
    hosts = "gpu-a01 slots=4|gpu-a02 slots=4|"
    for rank, line in enumerate(lines):
        assert line == (f"node{rank}:{hosts}<--hostfile><{tmp_path}/camex_hostfile.42.{rank}><--no_ssh>"
                        f"<--node_rank><{rank}><--master_addr><gpu-a01><--master_port><29500>"
                        f"<launcher/pretrain.py><--output_dir></shared/runs/x y>")
    assert len(lines) == 2


# ---------------------------------------------------------------------------
# build context and the dependency helper
# ---------------------------------------------------------------------------


def _repo_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return files


def test_dockerignore_keeps_sources_and_drops_outputs(ignore_rules, pyproject):
    needed = [f for f in _repo_files()
              if f.split("/")[0] in ("camex_ds", "launcher", "ds_configs", "tools", "docker")
              and "__pycache__" not in f and not f.endswith(".pyc")]
    needed += ["pyproject.toml", pyproject.get("readme", "README.md")]
    leaked = [f for f in needed if is_ignored(f, ignore_rules)]
    assert not leaked, f".dockerignore excludes files the image needs: {leaked}"
    for path in ("runs/exp/ckpt/model.pt", ".git/HEAD", "camex_ds/__pycache__/x.cpython-311.pyc",
                 "build/lib/x.py", "camex_ds.egg-info/PKG-INFO", ".pytest_cache/v/x"):
        assert is_ignored(path, ignore_rules), f"{path} should be excluded from the build context"


def test_deps_helper_requirements_match_pyproject(pyproject):
    r = subprocess.run([sys.executable, str(DEPS_HELPER), "requirements", str(ROOT / "pyproject.toml"),
                        "--extra", "gpu", "--exclude", "torch"], capture_output=True, text=True, check=True)
    expected = [d for d in pyproject["dependencies"] if canonicalize_name(Requirement(d).name) != "torch"]
    expected += pyproject["optional-dependencies"]["gpu"]
    assert r.stdout.splitlines() == expected


def test_deps_helper_constraints_pin_installed_torch():
    from importlib import metadata

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        pytest.skip("torch not installed")
    r = subprocess.run([sys.executable, str(DEPS_HELPER), "constraints"], capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert f"torch=={torch_version}" in lines
    for line in lines:
        name, _, version = line.partition("==")
        assert name == "torch" or name.startswith(("torchvision", "torchaudio", "triton", "nvidia-")), line
        Version(version)


def test_deps_helper_check_reports_unsatisfied(tmp_path):
    fake = tmp_path / "pyproject.toml"
    fake.write_text('[project]\nname = "x"\nversion = "0"\ndependencies = ["packaging>=1", '
                    '"surely-not-installed-pkg==1.0"]\n')
    r = subprocess.run([sys.executable, str(DEPS_HELPER), "check", str(fake)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "surely-not-installed-pkg" in r.stderr and "ok  packaging" in r.stdout


def test_readme_documents_verification():
    readme = (DOCKER / "README.md").read_text()
    for needle in ("What was verified", "hostfile", "--no_ssh", "slurm_pretrain.sbatch", "--shm-size"):
        assert needle in readme, needle
    assert "megablocks" in readme and "2.7.0" in readme
