"""The sanitizer report parser (``pfcollector.report``).

Rules: fixtures are real reports of the targets in ``tests/targets/`` (``python -m
tests.sanitizer_targets`` rewrites them); when clang is installed the targets are rebuilt and
their fresh reports must parse to the stored signatures, so the fixtures cannot drift from
what sanitizers print. Hostile text never makes the parser raise, and what it reads is bounded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfcollector import report
from pfcollector._frames import Frame, bare_function, crash_state, parse_frame
from pfcollector.report import MAX_TEXT, parse
from tests import sanitizer_targets as targets

EXPECTED: dict[str, str | None] = json.loads(targets.EXPECTED.read_text())


def fixture(name: str) -> str:
    return (targets.REPORTS / f"{name}.txt").read_text()


def test_every_case_has_a_fixture_and_an_expected_signature() -> None:
    names = {case.name for case in targets.CASES}
    assert names == set(EXPECTED)
    assert names == {p.stem for p in targets.REPORTS.glob("*.txt")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_parses_to_its_signature(name: str) -> None:
    assert parse(fixture(name)).signature == EXPECTED[name]


@pytest.mark.parametrize(
    ("name", "tool", "crash_type", "top"),
    [
        ("asan-heap-buffer-overflow", "AddressSanitizer", "heap-buffer-overflow READ 4",
         ("read_past_heap", "bugs.c", 17)),
        ("asan-stack-buffer-overflow", "AddressSanitizer", "stack-buffer-overflow WRITE {*}",
         ("__asan_memcpy", "", 0)),
        ("asan-global-buffer-overflow", "AddressSanitizer", "global-buffer-overflow READ 4",
         ("read_past_global", "bugs.c", 30)),
        ("asan-heap-use-after-free", "AddressSanitizer", "heap-use-after-free READ 1",
         ("use_after_free", "bugs.c", 37)),
        ("asan-double-free", "AddressSanitizer", "double-free", ("free", "", 0)),
        ("asan-segv", "AddressSanitizer", "null-dereference READ", ("null_deref", "bugs.c", 48)),
        ("asan-stack-overflow", "AddressSanitizer", "stack-overflow", ("recurse", "bugs.c", -1)),
        ("asan-leak", "LeakSanitizer", "direct-leak", ("__interceptor_malloc", "", 0)),
        ("ubsan-signed-integer-overflow", "UndefinedBehaviorSanitizer",
         "signed-integer-overflow", ("overflow_int", "bugs.c", 59)),
        ("msan-uninitialized", "MemorySanitizer", "use-of-uninitialized-value",
         ("main", "msan.c", 12)),
        ("tsan-data-race", "ThreadSanitizer", "data-race", ("bump", "tsan.c", 6)),
        ("libfuzzer-timeout", "libFuzzer", "timeout", ("__sanitizer_print_stack_trace", "", 0)),
        ("libfuzzer-oom", "libFuzzer", "out-of-memory", ("__sanitizer_print_stack_trace", "", 0)),
        ("glibc-assertion", "glibc", "assertion-failure", None),
    ],
)  # fmt: skip
def test_crash_type_tool_and_top_frame(
    name: str, tool: str, crash_type: str, top: tuple[str, str, int] | None
) -> None:
    parsed = parse(fixture(name))
    assert (parsed.tool, parsed.crash_type) == (tool, crash_type)
    if top is None:
        assert parsed.frames == ()
    else:
        first = parsed.frames[0]
        line = first.line if top[2] >= 0 else -1  # -1: where recursion runs out varies
        assert (first.function, Path(first.file).name if first.file else "", line) == top


def test_the_report_may_be_in_stack_trace_and_output_only_a_note() -> None:
    text = fixture("asan-heap-use-after-free")
    assert parse("AFL++ crash id:000001", text).signature == EXPECTED["asan-heap-use-after-free"]


def test_frames_elsewhere_than_after_the_header_are_used() -> None:
    lines = fixture("asan-heap-buffer-overflow").splitlines()
    frames = "\n".join(lines[3 : lines.index("", 3)])  # the crash stack only
    parsed = parse("==1==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x1", frames)
    assert parsed.state == ("read_past_heap", "dispatch")


def test_sizes_the_input_chooses_are_one_bug() -> None:
    """memcpy overflows by as many bytes as the input is long: one bug, not one per length.
    So do odd sizes; a plain load or store keeps its 1, 2, 4, 8 or 16."""
    memcpy = fixture("asan-stack-buffer-overflow")
    assert "WRITE of size 16 " in memcpy
    sizes = {parse(memcpy.replace("WRITE of size 16 ", f"WRITE of size {n} ")).crash_type
             for n in (2, 13, 16, 300)}  # fmt: skip
    assert sizes == {"stack-buffer-overflow WRITE {*}"}
    load = fixture("asan-heap-buffer-overflow")
    assert parse(load).crash_type == "heap-buffer-overflow READ 4"
    odd = parse(load.replace("READ of size 4 ", "READ of size 12 ")).crash_type
    assert odd == "heap-buffer-overflow READ {*}"


def test_a_segv_away_from_the_zero_page_is_not_a_null_dereference() -> None:
    text = fixture("asan-segv").replace("unknown address 0x000000000000", "unknown address 0x7f12")
    assert parse(text).crash_type == "SEGV on unknown address READ"


def test_a_sanitizer_report_wins_over_libfuzzers_own_line() -> None:
    text = "==9== ERROR: libFuzzer: deadly signal\n" + fixture("asan-segv")
    assert parse(text).crash_type == "null-dereference READ"


@pytest.mark.parametrize(
    ("line", "crash_type", "state"),
    [
        ("free(): double free detected in tcache 2", "abort",
         ("free(): double free detected in tcache 2",)),
        ("*** stack smashing detected ***: terminated", "stack-smashing", ()),
        ("*** Error in `./prog': double free or corruption (fasttop): 0x0000000001c8e010 ***",
         "abort", ("double free or corruption (fasttop)",)),
        ("x.c:3:5: runtime error: division by zero", "divide-by-zero", ("x.c:3",)),
        ("/src/x.c:3:5: runtime error: load of null pointer of type 'int'",
         "null-dereference READ", ("x.c:3",)),
        ("x.c:3:5: runtime error: shift exponent 40 is too large", "undefined-shift",
         ("x.c:3",)),
        ("==7== ERROR: libFuzzer: deadly signal", "deadly-signal", ()),
        ("==7== ERROR: libFuzzer: fuzz target exited", "fuzz-target-exited", ()),
        ("prog: a.cc:9: int ns::Foo<int, char>::bar(int) const: Assertion `n' failed.",
         "assertion-failure", ("ns::Foo<int, char>::bar", "Assertion `n' failed")),
    ],
)  # fmt: skip
def test_one_line_reports(line: str, crash_type: str, state: tuple[str, ...]) -> None:
    parsed = parse(f"some noise\n{line}\n")
    assert parsed.crash_type == crash_type
    assert parsed.state == state
    # Without a state the type alone would merge distinct bugs: no signature, input dedupe.
    assert parsed.signature == ("\n".join((crash_type, *state)) if state else None)


def test_without_frames_the_summary_line_names_the_function() -> None:
    text = "\n".join(
        line for line in fixture("asan-heap-buffer-overflow").splitlines()
        if not line.lstrip().startswith("#")
    )  # fmt: skip
    assert parse(text).state == ("read_past_heap",)


@pytest.mark.parametrize(
    ("name", "bare"),
    [
        ("operator new(unsigned long)", "operator new"),
        ("std::vector<int>::operator[](unsigned long)", "std::vector<int>::operator[]"),
        ("a::operator()(int) const", "a::operator()"),
        ("foo::operator<(foo const&)", "foo::operator<"),
        ("foo::operator<<(int)", "foo::operator<<"),
        ("x::operator bool() const", "x::operator bool"),
        ("int ns::Foo<int, char>::bar(int) const", "ns::Foo<int, char>::bar"),
    ],
)
def test_function_names_lose_parameters_and_return_types(name: str, bare: str) -> None:
    assert bare_function(name) == bare


def test_operator_new_is_a_runtime_frame() -> None:
    frames = [Frame("operator new(unsigned long)", module="asan"), Frame("make_thing()", "a.cc", 4)]
    assert crash_state(frames, 3) == ("make_thing",)


def test_text_without_a_report_has_no_signature() -> None:
    for text in ("", "AFL++ crash id:000000,sig:11", "#0 0x1 in f a.c:1:1",
                 "corrupted input: bad magic", "free(x) failed",
                 "lua: runtime error: attempt to call a nil value"):  # fmt: skip
        assert parse(text).signature is None


def test_frame_forms() -> None:
    assert parse_frame("#3 0x7f14  (/lib/x86_64-linux-gnu/libc.so.6+0x3c04f) (BuildId: 93ac)") == (
        Frame("", "", 0, "libc.so.6")
    )
    assert parse_frame("#0 pthread_create <null> (tsan+0x513ad) (BuildId: 53)") == Frame(
        "pthread_create", "", 0, "tsan"
    )
    assert parse_frame("#0 0x55 in recurse /src/bugs.c:50") == Frame("recurse", "/src/bugs.c", 50)
    assert parse_frame("#12 0x55 in a::b(int, char) (/x/fuzzer+0x33046)") == Frame(
        "a::b(int, char)", "", 0, "fuzzer"
    )
    assert parse_frame("not a frame") is None


def test_state_drops_runtime_frames_and_keeps_an_entry_point_only_as_a_last_resort() -> None:
    frames = [
        Frame("__asan_memcpy", module="asan"),
        Frame("raise"),
        Frame("", module="libc.so.6"),
        Frame("memcpy"),
        Frame("fuzzer::Fuzzer::RunOne(unsigned char const*)", module="fuzzer"),
        Frame("__libc_start_call_main", "csu/../sysdeps/nptl/libc_start_call_main.h", 58),
        Frame("parse_header(char const*)", "a.c", 3),
        Frame("LLVMFuzzerTestOneInput", "a.c", 9),
    ]
    assert crash_state(frames, 3) == ("parse_header",)
    assert crash_state(frames[:6] + frames[7:], 3) == ("LLVMFuzzerTestOneInput",)
    assert bare_function("(anonymous namespace)::Reader::next() const") == (
        "(anonymous namespace)::Reader::next"
    )


def test_what_lies_past_max_text_is_not_read() -> None:
    header = fixture("asan-segv")
    assert parse("x" * (MAX_TEXT + 10) + "\n" + header).signature is None
    assert parse("x\n" * 1000 + header).signature == EXPECTED["asan-segv"]


def test_hostile_lines_are_cut() -> None:
    """Lines that would make a backtracking parser quadratic are read in bounded slices."""
    evil = [
        "#0 a" + " " * 50_000 + "b)",
        "p: " + ":" * 50_000 + ": Assertion `x' failed.",
        "x" * 50_000 + " runtime error: ",
        "#0 " + "(" * 50_000,
        "ERROR: AddressSanitizer: " + "-" * 50_000,
    ]
    for line in evil:
        parse("\n".join([line] * 30))  # must return; a regression here hangs, not fails


_report_ish = st.lists(
    st.sampled_from(
        [
            "==1==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x1",
            "READ of size 4 at 0x1 thread T0",
            "#0 0x1 in f a.c:1:2",
            "#1 0x2  (/lib/libc.so.6+0x1)",
            "#2 0x3 in (anonymous namespace)::g<int>(int) (m+0x2) (BuildId: ab)",
            "Direct leak of 4 byte(s)",
            "WARNING: ThreadSanitizer: data race (pid=3)",
            "a.c:1:1: runtime error: ",
            "==7== ERROR: libFuzzer: timeout after 1 seconds",
            "p: a.c:1: f: Assertion `' failed.",
            "SEGV on unknown address 0xzz",
            "",
        ]
    )
    | st.text(max_size=80),
    max_size=40,
).map("\n".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(output=_report_ish | st.text(), stack_trace=_report_ish | st.text())
def test_never_raises_on_any_text(output: str, stack_trace: str) -> None:
    parsed = parse(output, stack_trace)
    assert isinstance(parsed, report.Report)
    assert len(parsed.state) <= report.STATE_FRAMES
    assert len(parsed.frames) <= report.MAX_FRAMES
    if parsed.signature is not None:
        assert parsed.signature.startswith(parsed.crash_type)
    assert parsed == parse(output, stack_trace)  # deterministic


@pytest.mark.usefixtures("clang")  # the fixtures are rebuilt with clang (conftest.require_tool)
def test_fresh_reports_of_the_rebuilt_targets_have_the_stored_signatures() -> None:
    fresh = targets.capture_all()
    got = {name: parse(text).signature for name, text in fresh.items()}
    assert got == EXPECTED
