"""MLflow tracking: the flattened config, run creation and resumption, the rank-0 logger, and
`launch.py compare`."""

from __future__ import annotations

import re

import pytest

from hstu.config.loader import load_config
from hstu.train import tracking


@pytest.fixture(scope="module")
def smoke_config(smoke_recipe):
    return load_config(smoke_recipe, ["data_config.batch_size=8"])


def test_flattened_config_keys_are_field_paths_mlflow_accepts(smoke_config):
    flat = tracking.flatten_config(smoke_config)
    assert flat["data_config.batch_size"] == "8"
    assert flat["model_config.kernel"] == "PYTORCH"  # enums by name
    assert flat["model_config.dlrm_hstu.hstu.stu.num_heads"] == "2"
    assert flat["feature_configs.user_id.id_feature.num_buckets"] == "1000"
    # Repeated messages are keyed by their name field, repeated scalars joined.
    tasks = "model_config.dlrm_hstu.fusion_mtl_tower.task_configs"
    assert flat[f"{tasks}.is_like.task_bitmask"] == "2"
    assert flat[f"{tasks}.is_click.losses.0.binary_cross_entropy.label_smoothing"] == "0.0"
    preprocessor = "model_config.dlrm_hstu.hstu.input_preprocessor.contextual_preprocessor"
    assert flat[f"{preprocessor}.content_encoder.slice_content_encoder"] == "{}"  # set, empty
    assert flat["model_config.feature_groups.uih.feature_names"] == "uih_seq__video_id"
    action = ("model_config.dlrm_hstu.hstu.input_preprocessor.contextual_preprocessor."
              "action_encoder.simple_action_encoder.action_weights")
    assert flat[action] == "1,2,4,8,16,32,64,128"
    for key in flat:
        assert re.fullmatch(r"[/\w.\- :]+", key) and len(key) <= 250, key


def test_tracking_uri_prefers_the_flag_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri(None, tmp_path) == "http://mlflow:5000"
    assert tracking.resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    first = tracking.start_run(uri, "exp", "run-a", tags={"hstu.ray_run_name": "run-a"},
                               params={"lr": "0.1", "batch": "8"})
    second = tracking.start_run(uri, "exp", "run-b", tags={"hstu.ray_run_name": "run-b"},
                                params={"lr": "0.2", "batch": "8"})
    for run_id, auc in ((first, 0.61), (second, 0.72)):
        tracking.RunLogger(uri, run_id).metrics({"eval/auc/is_click": auc, "train/loss": 1.0},
                                                step=4)
        tracking.end_run(uri, run_id, "FINISHED")
    return uri, first, second, root


def test_runs_are_created_with_params_tags_and_artifacts_beside_the_database(two_runs):
    uri, first, _, root = two_runs
    run = tracking.client(uri).get_run(first)
    assert run.info.run_name == "run-a"
    assert run.data.params == {"lr": "0.1", "batch": "8"}
    assert run.data.tags["hstu.ray_run_name"] == "run-a"
    assert run.info.artifact_uri.startswith((root / "mlruns").as_uri())


def test_resuming_keeps_logged_params_and_adds_new_ones(two_runs, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "run", tags={}, params={"lr": "0.1"})
    tracking.end_run(uri, run_id, "FAILED")
    again = tracking.start_run(uri, "exp", "run", tags={"hstu.resumed": "true"},
                               params={"lr": "0.5", "workers": "2"}, resume_run_id=run_id)
    assert again == run_id
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"lr": "0.1", "workers": "2"}
    assert "param lr was '0.1' in this run, now '0.5'" in capsys.readouterr().err
    tracking.write_run_link(tmp_path / "ray-run", uri, run_id)
    assert tracking.read_run_link(tmp_path / "ray-run") == {"tracking_uri": uri, "run_id": run_id}


def test_logger_survives_an_unreachable_tracking_store(tmp_path, capsys):
    logger = tracking.RunLogger(f"sqlite:///{tmp_path}/missing/dir/mlflow.db", "no-such-run")
    logger.metrics({"train/loss": 1.0}, step=1)
    logger.text("x", "a.txt")
    assert logger.failures >= 1
    assert "mlflow:" in capsys.readouterr().err


def test_compare_shows_differing_params_and_final_metrics(two_runs):
    from hstu.cli.compare import comparison, find_run

    uri, first, second, _ = two_runs
    mlflow_client = tracking.client(uri)
    runs = [find_run(mlflow_client, first), find_run(mlflow_client, "run-b")]  # id or name
    assert runs[1].info.run_id == second
    text = comparison(runs)
    lines = text.splitlines()
    assert lines[0].split() == ["run-a", "run-b"]
    lr_line = next(line for line in lines if line.startswith("lr "))
    assert lr_line.split() == ["lr", "0.1", "0.2"]
    assert not any(line.startswith("batch ") for line in lines)  # equal params are hidden
    auc_line = next(line for line in lines if line.startswith("eval/auc/is_click"))
    assert auc_line.split() == ["eval/auc/is_click", "0.61", "0.72"]
    assert any(line.startswith("batch ") for line in comparison(runs, all_params=True).splitlines())


def test_float32_fields_are_logged_as_written(smoke_config):
    flat = tracking.flatten_config(smoke_config)
    assert flat["train_config.sparse_optimizer.rowwise_adagrad_optimizer.lr"] == "0.05"
    assert flat["train_config.dense_optimizer.adam_optimizer.lr"] == "0.003"


def test_an_unreachable_tracking_server_is_one_clear_error_before_ray_starts():
    import socket

    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(tracking.TrackingServerError) as error:
        tracking.check_server_reachable(f"http://127.0.0.1:{port}", "--mlflow-uri", timeout_s=5)
    message = str(error.value)
    assert f"http://127.0.0.1:{port} (from --mlflow-uri) is not reachable" in message
    assert "MLFLOW_TRACKING_URI" in message
    from hstu.cli.train import error_line

    assert error_line(error.value) == message  # the CLI prints it as one line


def test_a_tracking_server_that_answers_passes_even_when_it_refuses_the_request():
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    for status_path in ("/health", "/elsewhere"):
        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.handle_request, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{server.server_port}"
        # "/elsewhere": the server answers 404 to /health, still an answer, still reachable.
        uri = base if status_path == "/health" else base + "/elsewhere"
        tracking.check_server_reachable(uri, "MLFLOW_TRACKING_URI", timeout_s=5)
        thread.join(5)
        server.server_close()
    assert seen == ["/health", "/elsewhere/health"]
    # Non-http stores are MLflow's business: no network call, no error.
    tracking.check_server_reachable("sqlite:////nonexistent/dir/mlflow.db", "the default")


def test_a_tls_server_with_a_certificate_urllib_does_not_trust_counts_as_reachable(tmp_path):
    """MLflow may be told to trust it (MLFLOW_TRACKING_INSECURE_TLS, a private CA): the probe
    must not refuse what MLflow can use."""
    import datetime
    import http.server
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(1)
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        tracking.check_server_reachable(f"https://127.0.0.1:{server.server_port}",
                                        "MLFLOW_TRACKING_URI", timeout_s=5)
    finally:
        thread.join(5)
        server.server_close()
