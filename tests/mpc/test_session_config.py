"""Session settings of the party CLIs (secure_inference.mpc.session_config): YAML file,
flags over file over defaults, addresses, TLS material."""
from __future__ import annotations

from pathlib import Path

import pytest

from secure_inference.mpc.session_config import (DEFAULTS, SessionConfigError, TLSSetupError,
                                                 merge_settings, parse_address, party_addresses,
                                                 read_session_file, tls_config)


def test_flags_win_over_the_file_which_wins_over_defaults(tmp_path):
    (tmp_path / "model.py").write_text("# a config\n")
    session = tmp_path / "session.yaml"
    session.write_text("model: model.py\nspec: specs/s.pickle\ncerts: /abs/certs\n"
                       "frac_bits: 14\ntimeout: 5\n")
    cfg = merge_settings({"timeout": 9.0, "spec": None}, session)
    assert cfg["model"] == str(tmp_path / "model.py")            # exists there: made absolute
    assert cfg["spec"] == str(tmp_path / "specs/s.pickle")       # relative to the file
    assert cfg["certs"] == "/abs/certs"
    assert (cfg["frac_bits"], cfg["timeout"]) == (14, 9.0)
    assert cfg["drop_bits"] == DEFAULTS["drop_bits"] and cfg["batch_size"] == 1
    assert merge_settings({"model": "resnet18"})["model"] == "resnet18"


@pytest.mark.parametrize("text,message", [("- a\n- b\n", "mapping"),
                                          ("model: x\nbogus: 1\n", "unknown keys")])
def test_bad_session_files(tmp_path, text, message):
    session = tmp_path / "s.yaml"
    session.write_text(text)
    with pytest.raises(SessionConfigError, match=message):
        read_session_file(session)


def test_missing_model_or_file():
    with pytest.raises(SessionConfigError, match="no model"):
        merge_settings({})
    with pytest.raises(SessionConfigError, match="config file not found"):
        merge_settings({"model": "resnet18"}, Path("/nonexistent/session.yaml"))


def test_addresses():
    assert parse_address("127.0.0.2:7001", "server") == ("127.0.0.2", 7001)
    assert parse_address("[::1]:80", "helper") == ("::1", 80)
    for bad in ("127.0.0.1", "host:port", ""):
        with pytest.raises(SessionConfigError, match="--server must be HOST:PORT"):
            parse_address(bad, "server")
    cfg = {"client": "10.0.0.1", "server": "10.0.0.2:1", "helper": "10.0.0.3:2"}
    assert party_addresses(cfg) == {0: ("10.0.0.1", 0), 1: ("10.0.0.2", 1), 2: ("10.0.0.3", 2)}
    with pytest.raises(SessionConfigError, match="no address for the helper"):
        party_addresses({**cfg, "helper": None})


def test_tls_material(tmp_path):
    assert tls_config(0, {"plaintext": True}) is None
    with pytest.raises(TLSSetupError, match="--certs FOLDER"):
        tls_config(0, {"plaintext": False})
    with pytest.raises(TLSSetupError, match="is not a folder"):
        tls_config(0, {"plaintext": False, "certs": str(tmp_path / "none")})
    with pytest.raises(TLSSetupError):
        tls_config(1, {"plaintext": False, "certs": str(tmp_path)})   # empty folder
    from secure_inference.mpc.certs import create_certificates
    create_certificates(tmp_path / "certs", {0: ["127.0.0.1"], 1: ["127.0.0.1"],
                                             2: ["127.0.0.1"]})
    assert tls_config(1, {"plaintext": False, "certs": str(tmp_path / "certs")}) is not None


def test_prg_from_flag_file_or_default_and_bad_values(tmp_path):
    session = tmp_path / "s.yaml"
    session.write_text("model: resnet18\nprg: chacha20\n")
    assert merge_settings({}, session)["prg"] == "chacha20"
    assert merge_settings({"prg": "aes"}, session)["prg"] == "aes"        # the flag wins
    assert merge_settings({"model": "resnet18"})["prg"] == "aes"          # the default
    session.write_text("model: resnet18\nprg: rc4\n")
    with pytest.raises(SessionConfigError, match="prg must be one of aes, chacha20"):
        merge_settings({}, session)


def test_party_clis_take_prg():
    from secure_inference.cli import client, crypto_provider, server
    for parser, extra in ((server.build_parser(), ["--checkpoint", "c.pth"]),
                          (client.build_parser(), ["--images", "x.npy"]),
                          (crypto_provider.build_parser(), [])):
        assert parser.parse_args(extra + ["--prg", "chacha20"]).prg == "chacha20"
        assert parser.parse_args(extra).prg is None          # unset: the file or the default
        with pytest.raises(SystemExit):
            parser.parse_args(extra + ["--prg", "rc4"])
