"""The deployment state (servekit.deploy.state) and its rendering into nginx.conf (servekit.deploy.proxy): no server."""

from __future__ import annotations

import json
import os
import socket as socket_module
import stat
import subprocess
from pathlib import Path

import pytest

from servekit.deploy.history import History
from servekit.deploy.proxy import NginxProxy, ProxyError, render_config
from servekit.deploy.rollout.sources import routed_uris
from servekit.deploy.state import (
    Canary,
    DeploymentState,
    DeploymentStore,
    ModelState,
    StateError,
    promotions_to_undo,
    read_state,
    write_state,
)
from servekit.serving.nginx import NginxError, nginx_binary
from servekit.serving.oip_service import default_router, render_front_config
from servekit.serving.router import private_socket_dir, remove_stale_socket, router_address, router_socket

# What servekit wrote before there was one deployment state: the proxy's routes only.
FORMAT_1 = {
    "listen": "127.0.0.1:8090",
    "upstream": "127.0.0.1:8080",
    "routes": {"digits": {"canary": {"version": "2.0", "percent": 20}, "shadow": "2.0"}},
}


def routed_state() -> DeploymentState:
    state = DeploymentState(listen="127.0.0.1:8090", upstream="127.0.0.1:8080")
    state.model("digits").set_canary("2.0", 20)
    state.model("digits").set_shadow("3.0")
    state.model("digits").observe("1.0", ["2.0", "1.0", "3.0"])
    state.model("letters").observe("1.0", ["1.0"])
    return state


@pytest.fixture
def store(tmp_path: Path) -> DeploymentStore:
    return DeploymentStore(tmp_path / "proxy" / "state.json", History(tmp_path / "deployments.jsonl"))


# ------------------------------------------------------------------------------------------ load, save, migrate
def test_no_file_is_an_empty_state(tmp_path: Path) -> None:
    state = read_state(tmp_path / "state.json")
    assert state == DeploymentState()
    assert state.to_json() == {"format": 2, "routes": {}, "models": {}}


def test_save_then_load_gives_the_same_state(store: DeploymentStore) -> None:
    state = routed_state()
    store.save(state)
    again = store.load()
    assert again == state
    assert again.model("digits").versions == ("1.0", "2.0", "3.0")


def test_the_file_keeps_format_1s_routes_and_adds_each_models_record(store: DeploymentStore) -> None:
    store.save(routed_state())
    data = json.loads(store.path.read_text())
    assert data["format"] == 2
    assert data["routes"] == {"digits": {"canary": {"version": "2.0", "percent": 20}, "shadow": "3.0"}}
    assert data["models"]["digits"]["default"] == "1.0"
    assert data["models"]["digits"]["versions"] == ["1.0", "2.0", "3.0"]
    assert set(data["models"]) == {"digits", "letters"}
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["state.json"]  # no temporary left


def test_a_format_1_file_is_read_as_it_is_and_saved_as_format_2(store: DeploymentStore) -> None:
    store.path.parent.mkdir()
    store.path.write_text(json.dumps(FORMAT_1))
    state = store.load()
    digits = state.model("digits")
    assert digits.canary == Canary("2.0", 20)
    assert digits.shadow == "2.0"
    assert digits.default is None  # filled in by the next command that asks TorchServe
    assert state.to_json()["routes"] == FORMAT_1["routes"]
    digits.observe("1.0", ["1.0", "2.0"])
    store.save(state)
    saved = json.loads(store.path.read_text())
    assert {k: saved[k] for k in FORMAT_1} == FORMAT_1  # nothing the operator had is lost
    assert saved["format"] == 2
    assert saved["models"]["digits"]["versions"] == ["1.0", "2.0"]


def test_an_old_canary_of_zero_percent_is_no_canary() -> None:
    state = DeploymentState.from_json({**FORMAT_1, "routes": {"digits": {"canary": {"version": "2.0", "percent": 0}}}})
    assert state.model("digits").canary is None
    assert state.routes() == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"listen": "127.0.0.1:1", "routes": {', "is corrupt ("),
        (b"\xff\xfe{}", "is corrupt ("),
        ("[1, 2]", "is invalid (not a JSON object)"),
        ('{"format": 3}', "is invalid (format 3 is not one this servekit reads (1 or 2))"),
        ('{"listen": 8090}', "is invalid (listen and upstream must be strings)"),
        ('{"listen": "127.0.0.1:8090; include /etc/passwd"}', "is invalid (listen and upstream must be host:port"),
        ('{"routes": {"bad name": {}}}', "is invalid (bad model name 'bad name')"),
        ('{"routes": {"digits": {"canary": {"version": "2.0", "percent": 101}}}}', "canary must be {version, percent"),
        ('{"routes": {"digits": {"shadow": "2.0; return 200"}}}', "digits: shadow must be a version string"),
        ('{"models": {"digits": {"versions": "1.0"}}}', "digits: versions must be a list of version strings"),
        ('{"models": {"digits": {"default": 1}}}', "digits: default must be a version string"),
    ],
)
def test_a_damaged_file_is_one_error_naming_the_file_and_the_repair(
    tmp_path: Path, content: str | bytes, message: str
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StateError) as refused:
        read_state(path)
    text = str(refused.value)
    assert text.startswith(f"proxy state {path} ")
    assert message in text
    assert text.endswith("fix it, or remove it to start again from no routes (then servekit proxy stop and start)")


# ------------------------------------------------------------------------------------------ one model's record
def test_routes_to_names_every_route_and_drop_routes_removes_them() -> None:
    model = ModelState("digits")
    model.set_canary("2.0", 20)
    model.set_shadow("2.0")
    assert model.routes_to("2.0") == ["canary (20%)", "shadow"]
    assert model.routes_to("1.0") == []
    assert model.drop_routes("2.0") == ["canary (20%)", "shadow"]
    assert model.routes() == {}


def test_canary_zero_removes_the_split_and_bad_input_is_refused() -> None:
    model = ModelState("digits")
    model.set_canary("2.0", 30)
    model.set_canary("2.0", 0)
    assert model.canary is None
    with pytest.raises(StateError, match=r"^--percent must be between 0 and 100, got 150$"):
        model.set_canary("2.0", 150)
    with pytest.raises(StateError, match=r"^bad version '2\.0\\n'$"):
        model.set_shadow("2.0\n")
    with pytest.raises(StateError, match=r"^bad model name 'a b'$"):
        DeploymentState().model("a b")


def test_promoting_the_canarys_version_completes_the_canary() -> None:
    model = ModelState("digits", canary=Canary("2.0", 100), shadow="3.0")
    assert model.promoted("3.0") is False
    assert model.canary == Canary("2.0", 100)
    assert model.promoted("2.0") is True
    assert (model.default, model.canary, model.shadow) == ("2.0", None, "3.0")


def test_versions_are_kept_in_numeric_order() -> None:
    model = ModelState("digits")
    model.observe("1.9", ["1.10", "1.9", "2"])
    assert model.versions == ("1.9", "1.10", "2")
    assert model.seen is not None


# ------------------------------------------------------------------------------------------ history and promotions
def test_promotions_to_undo_is_a_stack_and_ignores_other_events() -> None:
    events = [
        {"action": "register", "version": "2.0"},
        {"action": "promote", "version": "2.0", "previous_default": "1.0"},
        {"action": "canary", "version": "3.0", "percent": 10},
        {"action": "promote", "version": "3.0", "previous_default": "2.0"},
        {"action": "rollback", "version": "2.0", "previous_default": "3.0"},
    ]
    assert [e["version"] for e in promotions_to_undo(events)] == ["2.0"]
    assert promotions_to_undo([{"action": "rollback"}]) == []


def test_the_store_records_history_and_folds_each_models_promotions(store: DeploymentStore) -> None:
    store.record("promote", "digits", version="2.0", previous_default="1.0")
    store.record("promote", "letters", version="5.0", previous_default="4.0")
    store.record("promote", "digits", version="3.0", previous_default="2.0")
    store.record("rollback", "digits", version="2.0", previous_default="3.0")
    assert [e["version"] for e in store.promotions("digits")] == ["2.0"]
    assert [e["version"] for e in store.promotions("letters")] == ["5.0"]
    assert [e["action"] for e in store.events("digits")] == ["promote", "promote", "rollback"]
    lines = [json.loads(line) for line in store.history.path.read_text().splitlines()]
    assert [(e["action"], e["model"]) for e in lines][:2] == [("promote", "digits"), ("promote", "letters")]


def test_describe_is_one_record_per_model(store: DeploymentStore) -> None:
    state = routed_state()
    store.save(state)
    store.record("promote", "digits", version="1.0", previous_default="0.9")
    store.record("canary", "digits", version="2.0", percent=20)
    record = store.describe("digits")["digits"]
    assert record["default"] == "1.0"
    assert record["versions"] == ["1.0", "2.0", "3.0"]
    assert record["canary"] == {"version": "2.0", "percent": 20}
    assert record["shadow"] == "3.0"
    assert [p["version"] for p in record["promotions"]] == ["1.0"]
    assert record["last_event"]["action"] == "canary"
    assert set(store.describe()) == {"digits", "letters"}


# ------------------------------------------------------------------------------------------ render_config
def test_render_config_is_a_pure_function_of_the_state(tmp_path: Path) -> None:
    state = routed_state()
    text = render_config(state, tmp_path)
    assert text == render_config(state.to_json(), tmp_path)  # the object or its JSON form: the same file
    assert text == render_config(DeploymentState.from_json(json.loads(json.dumps(state.to_json()))), tmp_path)
    assert text.startswith(f"# Written by servekit.deploy.proxy from {tmp_path / 'state.json'}")
    assert "listen 127.0.0.1:8090;" in text
    assert "server 127.0.0.1:8080;" in text
    assert 'split_clients "${request_id}" $servekit_digits {\n        20% "/2.0";\n        * "";\n    }' in text
    route = '"" $uri;\n        default /predictions/digits$servekit_digits;'
    assert f"map $servekit_digits $servekitroute_digits {{\n        {route}" in text
    assert "location = /predictions/digits {\n            set $servekitlog_target $servekit_digits;" in text
    assert text.count("proxy_pass http://torchserve$servekitroute_digits;") == 3  # native, OIP v2, KServe v1
    assert "mirror /_shadow/digits;" in text
    assert "proxy_pass http://torchserve/predictions/digits/3.0;" in text
    assert "letters" not in text  # a model with no routes goes straight through "location /"
    assert f"pid {tmp_path / 'nginx.pid'};" in text


def test_every_protocols_inference_path_obeys_the_canary_and_the_shadow(tmp_path: Path) -> None:
    text = render_config(routed_state(), tmp_path)
    for path in ("/predictions/digits", "/v2/models/digits/infer", "/v1/models/digits:predict"):
        block = text.split(f"location = {path} {{\n", 1)[1].split("}", 1)[0]
        assert block == (
            "            set $servekitlog_target $servekit_digits;\n"
            "            mirror /_shadow/digits;\n"
            "            mirror_request_body on;\n"
            "            proxy_pass http://torchserve$servekitroute_digits;\n        "
        ), path


def test_a_mirrored_request_keeps_the_split_s_choice_for_the_request_log(tmp_path: Path) -> None:
    # The mirror shares its request's variables and runs the server's `set $servekitlog_target ""` again.
    text = render_config(routed_state(), tmp_path)
    block = text.split("location = /_shadow/digits {\n", 1)[1].split("}", 1)[0]
    assert "            set $servekitlog_target $servekit_digits;\n" in block
    shadow_only = routed_state()
    shadow_only.model("digits").set_canary("2.0", 0)
    block = render_config(shadow_only, tmp_path).split("location = /_shadow/digits {\n", 1)[1].split("}", 1)[0]
    assert "servekitlog_target" not in block  # no split: the server's "" is right


def test_explanations_of_every_protocol_follow_the_canary_and_are_never_mirrored(tmp_path: Path) -> None:
    text = render_config(routed_state(), tmp_path)
    route = '"" $uri;\n        default /explanations/digits$servekit_digits;'
    assert f"map $servekit_digits $servekitexplain_digits {{\n        {route}" in text
    for path in ("/explanations/digits", "/v2/models/digits/explain", "/v1/models/digits:explain"):
        block = text.split(f"location = {path} {{\n", 1)[1].split("}", 1)[0]
        assert block == (
            "            set $servekitlog_target $servekit_digits;\n"
            "            proxy_pass http://torchserve$servekitexplain_digits;\n        "
        ), path
    # The rollout judges predictions only: an explanation's latency is tens of inferences.
    assert set(routed_uris("digits")) == {"/predictions/digits", "/v2/models/digits/infer", "/v1/models/digits:predict"}


def test_a_shadow_alone_mirrors_every_protocol_and_keeps_each_path(tmp_path: Path) -> None:
    state = DeploymentState("127.0.0.1:1", "127.0.0.1:2")
    state.model("digits").set_shadow("2.0")
    text = render_config(state, tmp_path)
    assert "split_clients" not in text
    for path in ("/predictions/digits", "/v2/models/digits/infer", "/v1/models/digits:predict"):
        assert f"location = {path} {{\n            mirror /_shadow/digits;" in text
        assert f"proxy_pass http://torchserve{path};" in text
    assert "explain" not in text  # no canary: explanations go straight through, as predictions do


def test_split_and_route_variables_of_two_models_never_collide(tmp_path: Path) -> None:
    state = DeploymentState("127.0.0.1:1", "127.0.0.1:2")
    state.model("x").set_canary("2.0", 10)
    state.model("route_x").set_canary("3.0", 10)
    text = render_config(state, tmp_path)
    for variable in ("$servekit_x {", "$servekit_route_x {", "$servekitroute_x {", "$servekitroute_route_x {"):
        assert variable in text


def test_a_hundred_percent_canary_sends_everything_to_the_canary(tmp_path: Path) -> None:
    state = DeploymentState("127.0.0.1:1", "127.0.0.1:2")
    state.model("digits").set_canary("2.0", 100)
    text = render_config(state, tmp_path)
    assert '$servekit_digits {\n        * "/2.0";\n    }' in text
    assert "mirror" not in text


def test_no_routes_is_a_plain_pass_through(tmp_path: Path) -> None:
    text = render_config(DeploymentState("127.0.0.1:1", "127.0.0.1:2"), tmp_path)
    assert "split_clients" not in text
    assert "location = /predictions/" not in text
    assert "location / {\n            proxy_pass http://torchserve;" in text


def test_render_config_refuses_what_would_reach_nginx_unchecked(tmp_path: Path) -> None:
    with pytest.raises(ProxyError, match="no listen or upstream address"):
        render_config(DeploymentState(), tmp_path)
    bad = DeploymentState("127.0.0.1:1", "127.0.0.1:2")
    bad.model("digits").canary = Canary("2.0; return 200", 10)  # set around the validating setter
    with pytest.raises(ProxyError, match=r"cannot render the proxy configuration: digits: canary must be"):
        render_config(bad, tmp_path)


def test_the_rendered_configuration_passes_nginx_check(tmp_path: Path) -> None:
    proxy = NginxProxy(tmp_path / "proxy", 18090, "127.0.0.1:18080")
    state = routed_state()
    proxy.install(render_config(state, proxy.prefix))
    result = subprocess.run(
        [nginx_binary(), "-t", "-p", str(proxy.prefix), "-c", str(proxy.conf)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_proxy_applies_its_address_only_where_the_state_has_none(tmp_path: Path) -> None:
    proxy = NginxProxy(tmp_path / "proxy", 18090, "127.0.0.1:18080")
    assert proxy.current().listen == "127.0.0.1:18090"
    write_state(proxy.state_file, DeploymentState(listen="127.0.0.1:9999", upstream="127.0.0.1:18080"))
    assert proxy.url("/x") == "http://127.0.0.1:9999/x"  # the first proxy write fixes the port, as before


# ------------------------------------------------------------------------------------------ the front's way in
def test_the_proxy_listens_for_the_front_on_a_socket_in_a_folder_of_its_users(tmp_path: Path) -> None:
    socket = router_socket(tmp_path)
    assert socket.parent == Path(f"/tmp/servekit-router-{os.getuid()}")
    assert socket != router_socket(tmp_path / "other")  # one socket per proxy folder
    assert len(os.fsencode(router_socket(tmp_path / ("x" * 200)))) < 100  # any prefix: a path a socket can have
    text = render_config(routed_state(), tmp_path)
    assert f"listen unix:{socket};" in text
    assert router_address(tmp_path) == f"unix:{socket}"
    assert default_router(tmp_path) == router_address(tmp_path / "proxy")  # make serve's front: servekit proxy's
    front = render_front_config(tmp_path, "127.0.0.1:8000", "127.0.0.1:8080", "127.0.0.1:8002",
                                router=default_router(tmp_path))  # fmt: skip
    assert f"server {router_address(tmp_path / 'proxy')} max_fails=" in front


def test_the_sockets_folder_is_made_private_and_a_stale_socket_is_removed(tmp_path: Path) -> None:
    folder = tmp_path / "sockets"
    folder.mkdir()
    folder.chmod(0o777)
    stale = socket_module.socket(socket_module.AF_UNIX)
    stale.bind(str(folder / "router.sock"))  # what a killed nginx leaves behind
    stale.close()
    private_socket_dir(folder / "router.sock")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o711  # others pass through; nobody else can bind its name
    assert (folder / "router.sock").exists()  # a check of the configuration leaves a live proxy's socket alone
    remove_stale_socket(folder / "router.sock")
    assert not (folder / "router.sock").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_socket_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 12345, 12345)
    with pytest.raises(NginxError, match="not a folder of this user's"):
        private_socket_dir(folder / "router.sock")


def test_a_model_named_like_the_logs_variable_keeps_its_canary_split(tmp_path: Path) -> None:
    state = DeploymentState(listen="127.0.0.1:18090", upstream="127.0.0.1:18080")
    state.model("target").set_canary("2.0", 30)
    text = render_config(state, tmp_path)
    assert 'split_clients "${request_id}" $servekit_target {' in text  # the model's split variable
    assert "set $servekit_target" not in text  # never overwritten by the request log's own variable
    assert "location = /predictions/target {\n            set $servekitlog_target $servekit_target;\n" in text
