"""``fedmaml client`` and ``fedmaml certs`` refuse what would otherwise pass silently: a host
that is not a host, an address that is not HOST:PORT, a SuperLink that cannot be reached, an
``--insecure`` SuperNode against a TLS SuperLink (it would retry forever), a certificate the
node cannot verify. Checked against real SuperLinks on 127.0.0.1."""

from __future__ import annotations

import pytest

from fedmaml.cli import main
from fedmaml.commands.certs import make_dev_certs
from fedmaml.commands.client import probe_superlink
from fedmaml.errors import FedmamlError
from fedmaml.federated.deployment import LocalFederation
from fedmaml.federated.processes import free_port

pytestmark = pytest.mark.timeout(300)


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_bad_host_for_certificates_is_refused(tmp_path, capsys):
    err = one_line_error(capsys, ["certs", str(tmp_path / "c"), "--host", "bad host!"])
    assert "'bad host!' is not a host name" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("address", ["not an address", "127.0.0.1", "host:99999", "a b:9092"])
def test_a_bad_superlink_address_is_refused_even_for_print_command(tmp_path, capsys, address):
    data = tmp_path / "d.csv"
    data.write_text("f,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    err = one_line_error(
        capsys,
        ["client", "--superlink", address, "--data", str(data), "--insecure", "--print-command"],
    )
    assert "HOST:PORT" in err or "not a host name" in err


def test_an_unreachable_superlink_is_said_at_once():
    with pytest.raises(FedmamlError, match="cannot reach the SuperLink"):
        probe_superlink(f"127.0.0.1:{free_port()}", insecure=True, ca=None, timeout=2)


def test_tls_and_insecure_mismatches_are_named(tmp_path):
    certs = make_dev_certs(tmp_path / "certs", nodes=0)
    other = make_dev_certs(tmp_path / "other", nodes=0)
    with LocalFederation(tmp_path / "plain") as plain:
        plain.start_superlink()
        probe_superlink(plain.address, insecure=True, ca=None)
        with pytest.raises(FedmamlError, match="does not speak TLS"):
            probe_superlink(plain.address, insecure=False, ca=certs.ca_cert)
    with LocalFederation(
        tmp_path / "tls", ca_cert=certs.ca_cert, cert=certs.server_cert, key=certs.server_key
    ) as tls:
        tls.start_superlink()
        probe_superlink(tls.address, insecure=False, ca=certs.ca_cert)
        with pytest.raises(FedmamlError, match="speaks TLS; drop --insecure"):
            probe_superlink(tls.address, insecure=True, ca=None)
        with pytest.raises(FedmamlError, match="cannot be verified"):
            probe_superlink(tls.address, insecure=False, ca=other.ca_cert)
