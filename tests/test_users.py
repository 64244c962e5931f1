from helpers import PUBLIC_USER_FIELDS, assert_error


def test_list_users_returns_active_users_by_name(client, auth_headers, make_user, user):
    make_user("zed", full_name="Zed Zimmer")
    make_user("bea", full_name="Bea Baker")
    make_user("bo", full_name="bo lowercase")
    make_user("old", full_name="Old Timer", is_active=False)

    response = client.get("/api/users", headers=auth_headers)

    assert response.status_code == 200
    users = response.get_json()["users"]
    assert [u["full_name"] for u in users] == ["Alice Adams", "Bea Baker", "bo lowercase", "Zed Zimmer"]
    assert all(set(u) == PUBLIC_USER_FIELDS for u in users)
    assert all(u["is_active"] is True for u in users)


def test_list_users_requires_a_token(client, user):
    assert_error(client.get("/api/users"), 401)
