"""A store given as a URL: ``s3://`` (and any installed fsspec protocol) is a remote store (the
commands themselves are tested against a real S3 server in test_store_s3.py); ``file://`` is the
local folder; an unknown protocol (often a mistyped local path) or a protocol whose fsspec backend is
missing is one clear message naming what to do, from every command that takes --store, and
nothing is written: no local folder named after the URL appears.

Issue 22: a URL that would name other objects than it seems to (a query, a fragment, a password,
``..``, ``file://HOST/``) is refused before anything is written, and the advice in the message works
when followed; saved configs keep only storage options known to hold no secret, and no message shows
an option's value; an endpoint that never answers fails within tens of seconds, naming the endpoint in
use and the timeout."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, SyntheticDataset, run_cli, run_cli_err
from helpers.s3server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)


@pytest.fixture(autouse=True)
def _options_undone(monkeypatch):
    """Options a command puts in force (SURPIPE_STORAGE_OPTIONS) are undone after each test."""
    monkeypatch.setenv("SURPIPE_STORAGE_OPTIONS", "")


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The test S3 server through the standard AWS variables, as a user would set them."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    return s3_server

COMMANDS = [
    ["extract-llm", "--data", "DATA", "--store", "URL", "--model", "LLM", "--layers", "1", "--no-progress"],
    ["encode-latents", "--data", "DATA", "--store", "URL", "--model", "SD", "--no-progress"],
    ["train", "--store", "URL", "--model", "SD", "--llm-layer", "1", "--out", "run", "--no-progress"],
    ["verify", "URL"],
    ["inspect", "URL"],
    ["eval", "--store", "URL", "--adapter", "AD", "--no-clip-score"],
]


@pytest.mark.parametrize("url, expected", [
    ("s4://bucket/prefix/surd.zarr", "unknown storage protocol 's4'"),  # a typo: not an fsspec protocol
    ("gs://bucket/surd.zarr", "pip install gcsfs"),  # a known protocol whose backend is not installed
])
@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_unknown_or_uninstalled_protocols_are_one_clear_error_and_nothing_is_written(argv, url, expected, tiny_models,
                                                                                   tmp_path, monkeypatch):
    import importlib.util

    if url.startswith("gs://") and importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    from surpipe.adapter import SURAdapter

    SURAdapter(width=32, nhead=4, dim_feedforward=64).save_pretrained(tmp_path / "ad")
    subst = {"DATA": str(REPO / "data" / "sample"), "LLM": str(tiny_models / "llm"), "SD": str(tiny_models / "sd"),
             "AD": str(tmp_path / "ad"), "URL": url}
    monkeypatch.chdir(tmp_path)
    rc, err = run_cli_err(*[subst.get(a, a) for a in argv])
    assert rc == 1, err
    assert expected in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("s4*")) and not list(tmp_path.glob("gs*"))


def test_url_stores_are_no_longer_refused():
    from surpipe.store.location import RemotePath, store_path

    p = store_path("s3://bucket/prefix/surd.zarr")
    assert isinstance(p, RemotePath) and str(p) == "s3://bucket/prefix/surd.zarr"
    assert str(p.with_name("surd.zarr.locks")) == "s3://bucket/prefix/surd.zarr.locks"


def test_file_urls_are_the_local_folder(tmp_path):
    from surpipe.store import FeatureStore

    ds = SyntheticDataset([(f"k{i}", f"s{i}", f"c{i}") for i in range(5)])
    st = FeatureStore.create_or_open(f"file://{tmp_path}/s.zarr", ds, block_rows=2)
    assert st.path == Path(tmp_path / "s.zarr") and (tmp_path / "s.zarr" / "zarr.json").is_file()
    assert FeatureStore(tmp_path / "s.zarr").num_samples == 5


# ------------------------------------------------------------------------------------------------ issue 22
def _extract(url, llm, *extra):
    return run_cli_err("extract-llm", "--data", REPO / "data" / "sample", "--store", url, "--model", llm,
                       "--layers", "1", "--block-rows", "8", "--batch-size", "4", "--no-progress", "--device", "cpu",
                       "--store-dtype", "float32", "--name", "t", *extra)


def _advice(err: str, prefix: str) -> str:
    """The URL a refusal tells the user to give instead (the message's last word)."""
    url = err.strip().split()[-1]
    assert url.startswith(prefix), err
    return url


@pytest.mark.parametrize("tail", ["?versionId=abc", "#abc", "?versionId=abc#x"])
def test_a_query_or_fragment_in_a_store_url_is_refused_before_anything_is_written(s3_env, s3_bucket, tail,
                                                                                  tiny_models):
    """s3fs reads "?versionId=" as an object version: every write went to the one key "v.zarr" and
    zarr failed with ContainsGroupError, leaving an object behind. Refused, the query never shown
    (it may be a signature), and the URL the message offers works."""
    from surpipe.store import FeatureStore
    from surpipe.store.location import RemotePath, store_path

    rc, err = _extract(f"{s3_bucket}/v.zarr{tail}", tiny_models / "llm")
    assert rc == 1 and "query" in err and "Traceback" not in err and "Warning" not in err, err
    assert "abc" not in err and len(err.strip().splitlines()) == 1, err
    bucket = s3_bucket[len("s3://"):]
    assert s3_env.fs().find(bucket) == []  # nothing written
    url = _advice(err, s3_bucket)
    assert url == f"{s3_bucket}/v.zarr" and isinstance(store_path(url), RemotePath)
    ds = SyntheticDataset([(f"k{i}", f"s{i}", f"c{i}") for i in range(3)])
    assert FeatureStore.create_or_open(url, ds, block_rows=2).num_samples == 3


def test_a_query_in_a_file_url_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli("verify", f"file://{tmp_path}/s.zarr?x=1")
    assert rc == 1 and "query" in err and err.strip().endswith(f"file://{tmp_path}/s.zarr"), err
    assert list(tmp_path.iterdir()) == []


def test_file_urls_with_a_host_follow_the_url_standard(tmp_path, monkeypatch):
    """file://localhost/PATH (and an empty host) is this machine's /PATH, not the relative folder
    ./localhost/PATH; another host is refused, and the plain path the message offers works."""
    from surpipe.store import FeatureStore
    from surpipe.store.location import store_path

    monkeypatch.chdir(tmp_path)
    ds = SyntheticDataset([(f"k{i}", f"s{i}", f"c{i}") for i in range(4)])
    for host in ("localhost", "LocalHost", ""):
        assert store_path(f"file://{host}{tmp_path}/s.zarr") == tmp_path / "s.zarr"
    st = FeatureStore.create_or_open(f"file://localhost{tmp_path}/s.zarr", ds, block_rows=2)
    assert st.path == tmp_path / "s.zarr" and not (tmp_path / "localhost").exists()
    rc, out, err = run_cli("verify", f"file://localhost{tmp_path}/s.zarr")
    assert rc == 0, err

    FeatureStore.create_or_open(tmp_path / "data" / "r.zarr", ds, block_rows=2)
    rc, out, err = run_cli("verify", "file://data/r.zarr")  # host "data": not ./data/r.zarr silently
    assert rc == 1 and "host 'data'" in err and "Traceback" not in err, err
    assert err.strip().endswith("data/r.zarr")
    rc, out, err = run_cli("verify", err.strip().split()[-1])  # the advice, followed
    assert rc == 0, err
    rc, out, err = run_cli("verify", "file://nas.example/share/s.zarr")
    assert rc == 1 and "host 'nas.example'" in err and not (tmp_path / "nas.example").exists(), err


@pytest.mark.parametrize("url, advice", [
    ("s3://b/x/../a.zarr", "s3://b/a.zarr"),
    ("s3://b/x/y/../../a.zarr", "s3://b/a.zarr"),
    ("s3://b//p/./a.zarr", "s3://b/p/a.zarr"),
    ("s3://b/p/a.zarr/..", "s3://b/p"),
    ("s3://b/../a.zarr", None),  # above the bucket: no URL means that
    ("s3://b/x/../../a.zarr", None),
])
def test_dot_dot_advice_is_the_normalised_url_and_works(url, advice):
    """The refusal once offered the refused URL itself ("e.g. s3://b/x/../a.zarr")."""
    from surpipe.errors import SurpipeError
    from surpipe.store.location import RemotePath, store_path

    with pytest.raises(SurpipeError) as e:
        store_path(url)
    msg = str(e.value)
    assert msg.count(url) == 1, msg  # named once, as the refused URL, never as the advice
    if advice is None:
        assert "write the URL without them" in msg and "s3://" not in msg.replace(url, ""), msg
    else:
        assert msg.endswith(f"write it as {advice}"), msg
        assert isinstance(store_path(advice), RemotePath)


@pytest.mark.parametrize("url", ["s3://AKIAUSER:Pa55wordXyz@b/s.zarr", "s3://AKIAUSER@b/s.zarr",
                                 "s3://AKIAUSER:Pa55wordXyz@b/s.zarr?versionId=1"])
def test_a_url_with_user_and_password_is_refused_without_echoing_them(url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli("verify", url)
    assert rc == 1 and "Traceback" not in err and "AKIAUSER" not in err and "Pa55word" not in err, err
    assert "user name or password" in err and err.strip().endswith("as s3://b/s.zarr"), err  # not cut off
    from surpipe.store.location import RemotePath, _refuse_userinfo, store_path

    assert isinstance(store_path("s3://b/s.zarr"), RemotePath)  # the advice works
    _refuse_userinfo("abfs", "container@account.dfs.core.windows.net", "/s.zarr")  # no password: not refused


SSEC_KEY = "SseC-Customer-Key-32-bytes-long!"
# every option of s3fs, gcsfs, adlfs (and generic ones) that may hold a credential, with a distinct value
SECRETS = {
    "key": "AKIAKEYVALUE01", "secret": "SecretValue02", "token": "SessionToken03",
    "username": "UserName04", "password": "Password05", "profile": "ProfileName06",
    "client_kwargs": {"aws_access_key_id": "AKIAClient07", "aws_secret_access_key": "ClientSecret08",
                      "aws_session_token": "ClientToken09", "region_name": "us-east-1"},
    "s3_additional_kwargs": {"SSECustomerKey": SSEC_KEY, "SSECustomerKeyMD5": "Md5Value10",
                             "SSEKMSKeyId": "arn:aws:kms:KmsKey11", "SSEKMSEncryptionContext": "Ctx12",
                             "SSECustomerAlgorithm": "AES256"},
    "config_kwargs": {"proxies": {"https": "http://proxyuser:ProxyPass13@proxy:3128"}, "read_timeout": 30,
                      "retries": {"total_max_attempts": 3}},
    # gcsfs
    "project": "my-project", "credentials": "Credentials14",
    "token_dict": {"type": "service_account", "private_key": "PrivateKey15", "client_email": "Email16"},
    # adlfs
    "account_name": "myaccount", "account_key": "AccountKey17", "sas_token": "SasToken18",
    "connection_string": "DefaultEndpointsProtocol=https;AccountKey=ConnString19", "credential": "Credential20",
    "client_id": "ClientId21", "client_secret": "ClientSecret22", "tenant_id": "TenantId23",
    # generic
    "apikey": "ApiKey24", "api_key": "ApiKey25", "passphrase": "Passphrase26", "auth": "Auth27",
    "headers": {"Authorization": "Bearer Header28"},
    "endpoint_url": "http://user29:Pass30@127.0.0.1:9",  # a URL with a password is no safe endpoint either
}
SECRET_VALUES = ["AKIAKEYVALUE01", "SecretValue02", "SessionToken03", "UserName04", "Password05", "ProfileName06",
                 "AKIAClient07", "ClientSecret08", "ClientToken09", SSEC_KEY, "Md5Value10", "KmsKey11", "Ctx12",
                 "ProxyPass13", "Credentials14", "PrivateKey15", "Email16", "AccountKey17", "SasToken18",
                 "ConnString19", "Credential20", "ClientId21", "ClientSecret22", "TenantId23", "ApiKey24",
                 "ApiKey25", "Passphrase26", "Auth27", "Header28", "user29", "Pass30"]


def test_saved_storage_options_are_an_allow_list():
    """Only options known to hold no secret are saved; gcsfs's token as a dict too is dropped."""
    from surpipe.config import redact_storage_options

    opts = {**SECRETS, "token": {"refresh_token": "Refresh31", "client_secret": "ClientSecret32"}}
    saved = redact_storage_options(json.dumps(opts))
    for v in SECRET_VALUES[:2] + SECRET_VALUES[3:] + ["Refresh31", "ClientSecret32"]:
        assert v not in saved, v
    assert json.loads(saved) == {
        "client_kwargs": {"region_name": "us-east-1"}, "s3_additional_kwargs": {"SSECustomerAlgorithm": "AES256"},
        "config_kwargs": {"read_timeout": 30, "retries": {"total_max_attempts": 3}},
        "project": "my-project", "account_name": "myaccount"}
    assert redact_storage_options(opts) == json.loads(saved)  # a mapping (Python callers) the same way


def test_every_command_saves_its_config_without_storage_option_secrets(tmp_path):
    """The saved configs (beside stores, in run folders, eval folders) all go through to_dict."""
    import importlib

    from surpipe import config as cfgmod

    classes = [getattr(importlib.import_module(m), c) for m, c in (
        ("stages.extract_llm", "ExtractLLMConfig"), ("stages.encode_latents", "EncodeLatentsConfig"),
        ("stages.import_prompt2vec", "ImportPrompt2VecConfig"), ("stages.verify", "VerifyConfig"),
        ("stages.inspect", "InspectConfig"), ("stages.eval", "EvalConfig"), ("surpipe.train.config", "TrainConfig"))]
    for cls in classes:
        required = {f.name: "x" for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        cfg = cls(**{**required, "storage_options": json.dumps(SECRETS)})
        cfgmod.save(cfg, tmp_path / f"{cls.__name__}.json")
        text = (tmp_path / f"{cls.__name__}.json").read_text()
        assert not [v for v in SECRET_VALUES if v in text], (cls.__name__, text)
        assert "us-east-1" in text, cls.__name__


def test_store_and_its_sidecar_and_the_log_keep_no_credential(s3_env, s3_bucket, tiny_models):
    """A real run with the s3 credential options s3fs accepts (an SSE-C key included): none reaches
    the group's zarr.json, the .configs sidecar or stderr."""
    md5 = base64.b64encode(hashlib.md5(SSEC_KEY.encode()).digest()).decode()
    opts = {"endpoint_url": s3_env.endpoint, "key": "AKIAKEYVALUE01", "secret": "SecretValue02",
            "client_kwargs": {"aws_session_token": "ClientToken09", "region_name": "us-east-1"},
            "s3_additional_kwargs": {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": SSEC_KEY,
                                     "SSECustomerKeyMD5": md5}}
    url = f"{s3_bucket}/sec.zarr"
    rc, err = _extract(url, tiny_models / "llm", "--storage-options", json.dumps(opts))
    assert rc == 0, err
    fs = s3_env.fs()
    bucket = s3_bucket[len("s3://"):]
    blobs = {p: fs.cat(p) for p in fs.find(bucket) if p.endswith(".json")}
    assert f"{bucket}/sec.zarr.configs/extract-llm-t.json" in blobs and f"{bucket}/sec.zarr/llm/t/zarr.json" in blobs
    for text in [*blobs.values(), err.encode()]:
        for v in ("AKIAKEYVALUE01", "SecretValue02", "ClientToken09", SSEC_KEY, md5):
            assert v.encode() not in text, v
    saved = json.loads(blobs[f"{bucket}/sec.zarr.configs/extract-llm-t.json"])["storage_options"]
    assert json.loads(saved)["s3_additional_kwargs"] == {"SSECustomerAlgorithm": "AES256"}


def test_no_message_shows_a_storage_option_value(s3_env, s3_bucket, tmp_path, monkeypatch):
    """storage_options as a JSON object in --config is taken (it was refused printing the whole dict);
    any other type is refused naming the type only; options the filesystem refuses are named by key."""
    from helpers.stores import make_store

    url = f"{s3_bucket}/o.zarr"
    make_store(url, n=8, block_rows=8)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    good = {"endpoint_url": s3_env.endpoint, "key": "AKIAKEYVALUE01", "secret": "SecretValue02"}
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"store": url, "storage_options": good}))
    rc, out, err = run_cli("verify", "--config", cfg)
    assert rc == 0 and "OK: no problems" in out, err
    for value in (["SecretValue02"], "SecretValue02", 5):
        cfg.write_text(json.dumps({"store": url, "storage_options": value}))
        rc, out, err = run_cli("verify", "--config", cfg)
        if isinstance(value, str):  # text that is no JSON: refused as such, without the text
            assert rc == 1 and "not valid JSON" in err and "SecretValue02" not in err, err
        else:
            assert rc == 1 and "expected a JSON object" in err and "SecretValue02" not in err, err
    for bad in ({**good, "username": "UserName04"}, {**good, "apikey": "ApiKey24"}):
        monkeypatch.setenv("SURPIPE_STORAGE_OPTIONS", "")  # the last command's options, put in force in-process
        rc, out, err = run_cli("verify", url, "--storage-options", json.dumps(bad))
        assert rc == 1 and "Traceback" not in err and "UserName04" not in err and "ApiKey24" not in err, err
        assert "SecretValue02" not in err and "AKIAKEYVALUE01" not in err, err
        assert "username" in err or "apikey" in err, err  # the key is named


def test_a_library_message_that_echoes_a_secret_is_blanked():
    from surpipe.store.remote import RemotePath, remote_failure

    where = RemotePath("s3", "b/s.zarr", {"secret": "SecretValue02", "endpoint_url": "http://127.0.0.1:9"})
    msg = str(remote_failure(RuntimeError("bad signature for SecretValue02\non the second line"), where))
    assert "SecretValue02" not in msg and "***" in msg and "on the second line" in msg and "\n" not in msg


class _Silent:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns = []
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def silent():
    s = _Silent()
    yield s
    s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_silent_endpoint_fails_within_the_timeouts_naming_endpoint_and_timeout(s3_env, silent, monkeypatch):
    """It blocked about 7 minutes without a word (s3fs's 15 s read timeout, 5 x 5 attempts). Short
    timeouts here; the defaults are checked to be bounded below."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")  # not the one in use
    opts = {"endpoint_url": silent.endpoint, "config_kwargs": {"connect_timeout": 1, "read_timeout": 0.5}}
    t0 = time.time()
    rc, out, err = run_cli("verify", "s3://b/s.zarr", "--storage-options", json.dumps(opts))
    took = time.time() - t0
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"the object store at {silent.endpoint} did not answer within read_timeout 0.5 s" in err, err
    assert "(2 x 2 attempts)" in err and took < 15, (took, err)
    assert len(silent.conns) == 4  # the default number of attempts: s3fs's 2 around botocore's 2
    monkeypatch.setenv("SURPIPE_STORAGE_OPTIONS", "")
    rc, out, err = run_cli("verify", "s3://b/s.zarr", "--storage-options",
                           json.dumps({**opts, "retries": 1, "config_kwargs": {
                               "read_timeout": 0.5, "retries": {"total_max_attempts": 1}}}))
    assert rc == 1 and "(1 x 1 attempts)" in err, err  # overridable in --storage-options


def test_s3_timeouts_and_retries_are_bounded_by_default(monkeypatch):
    from surpipe.store.remote import filesystem, s3_settings

    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    kw, retries = s3_settings({})
    ck = kw["config_kwargs"]
    assert ck["retries"] == {"total_max_attempts": 2, "mode": "standard"} and retries == 2
    worst = retries * ck["retries"]["total_max_attempts"] * (ck["connect_timeout"] + ck["read_timeout"])
    assert worst <= 60, worst  # a silent endpoint: a message within a minute, not seven
    fs = filesystem("s3", {"endpoint_url": "http://127.0.0.1:9"})
    assert fs.retries == 2 and fs.config_kwargs["read_timeout"] == ck["read_timeout"]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # the standard AWS setting still wins over the default
    assert s3_settings({})[0]["config_kwargs"]["retries"] == {"mode": "standard"}


def test_the_message_names_the_endpoint_in_use(s3_env, monkeypatch):
    """AWS_ENDPOINT_URL set and another endpoint_url in --storage-options: the latter is in use."""
    env_ep, used = f"http://127.0.0.1:{_closed_port()}", f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", env_ep)
    for opts in ({"endpoint_url": used}, {"client_kwargs": {"endpoint_url": used}}):
        monkeypatch.setenv("SURPIPE_STORAGE_OPTIONS", "")
        rc, out, err = run_cli("verify", "s3://b/s.zarr", "--storage-options", json.dumps(opts))
        assert rc == 1 and f"(endpoint {used})" in err and env_ep not in err, err
    monkeypatch.setenv("SURPIPE_STORAGE_OPTIONS", "")
    rc, out, err = run_cli("verify", "s3://b/s.zarr")
    assert rc == 1 and f"(endpoint {env_ep})" in err, err
