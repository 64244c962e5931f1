"""The API against its own contract, with requests nobody on the team wrote: schemathesis generates valid and
invalid input for every operation in /api/openapi.json and checks every answer against the document.

`make test` runs a fixed number of examples from a fixed seed (deterministic); `make fuzz` a longer campaign
(FUZZ_EXAMPLES, FUZZ_SEED)."""

import os
import uuid

import pytest
import schemathesis
import sqlalchemy as sa
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from helpers import token_for
from models import LoginSession, RevokedToken, Task, User, db

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
SEED = int(os.environ.get("FUZZ_SEED", "20261125"))
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {
            "mode": "all",  # valid and invalid input
            "max-examples": EXAMPLES,
            "database": "none",  # no examples replayed from earlier runs: the same run every time
            "with-security-parameters": False,  # each call carries a real token; the checks still try bad ones
            "allow-extra-parameters": False,  # most operations ignore unknown query parameters, as HTTP APIs do
        },
    }
)
# Schema-valid input the API turns down on purpose: an assignee id that is no active user, a new password equal
# to the current one, an empty update. The contract lists the 400; every other check runs.
EXCLUDED_CHECKS = [positive_data_acceptance]
MODELS = (User, Task, LoginSession, RevokedToken)


@pytest.fixture
def api_schema(app):
    return schemathesis.openapi.from_wsgi("/api/openapi.json", app, config=CONFIG)


schema = schemathesis.pytest.from_fixture("api_schema")


def snapshot(app) -> list[str]:
    """Every row the API can change, as text, a table at a time. The database writes and sorts the text: the tables
    grow with every example (a session per call, tasks for valid ones), and reading them back into Python objects
    for each invalid call was most of this test's time."""
    with app.app_context():
        dialect = db.session.get_bind().dialect
        return [db.session.execute(sa.text(table_as_text(model.__table__, dialect))).scalar_one() for model in MODELS]


def table_as_text(table: sa.Table, dialect) -> str:
    """A query for one text made of the table's rows: any change to any value changes it."""
    name = dialect.identifier_preparer.quote(table.name)
    if dialect.name == "postgresql":  # the count and the sum of each row's 64-bit hash: no text, nothing to sort
        return f"SELECT count(*) || ' ' || coalesce(sum(hash_record_extended(t, 0)::numeric), 0) FROM {name} AS t"
    row = " || ',' || ".join(f"quote({dialect.identifier_preparer.quote(column.name)})" for column in table.columns)
    return f"SELECT coalesce(group_concat(r, char(10)), '') FROM (SELECT {row} AS r FROM {name} ORDER BY r)"


def with_real_ids(case, make_task, caller: dict, colleague: dict) -> None:
    """Valid input names things that exist, so the answers past the 404s and 400s (the task, a 403, a 201) are
    checked too: task ids of tasks made for this call, the caller as assignee, the colleague as the account."""
    parameters = case.path_parameters or {}
    if "task_id" in parameters:
        # one the caller made and may change, one a colleague made and the caller may not
        mine, theirs = (
            make_task(contact_person_id=uuid.UUID(person["id"]), created_by_id=uuid.UUID(person["id"]))["id"]
            for person in (caller, colleague)
        )
        parameters["task_id"] = mine if int(str(parameters["task_id"])[-1], 16) % 2 else theirs
    if "user_id" in parameters:
        parameters["user_id"] = colleague["id"]
    if isinstance(case.body, dict) and "contact_person_id" in case.body:
        case.body["contact_person_id"] = caller["id"]


def is_invalid(case) -> bool:
    """Generated as bad input: a negative case, or a method the operation does not have (OPTIONS is CORS's)."""
    if case.method.upper() == "OPTIONS":
        return False
    return case.method.upper() != case.operation.method.upper() or case.meta.generation.mode is GenerationMode.NEGATIVE


@schema.parametrize()
@pytest.mark.slow  # a minute: hundreds of generated requests
@pytest.mark.app_config(RATELIMIT_ENABLED=False)  # a 429 would hide the answer under test
@pytest.mark.own_database  # thousands of commits
def test_every_operation_keeps_the_contract(case, app, make_task, admin, user, other_user):
    administration = case.path.startswith(("/api/users", "/api/invitations"))
    caller = admin if administration else user  # administration, and a colleague's work
    headers = {"Authorization": f"Bearer {token_for(app, caller['id'])}"}  # a fresh session: logout may end it
    invalid = is_invalid(case)
    if not invalid:
        with_real_ids(case, make_task, caller, other_user)
    before = snapshot(app) if invalid else None

    response = case.call(headers=headers)

    if invalid:
        assert snapshot(app) == before, f"bad input changed data: {case.method} {case.path} -> {response.status_code}"
    case.validate_response(response, headers=headers, excluded_checks=EXCLUDED_CHECKS)
