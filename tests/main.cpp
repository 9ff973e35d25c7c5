// The tests' main: doctest's, except that a run whose filters select no test case fails. The unit
// tests are one executable whose parts choose their file's cases by --source-file
// (tests/meson.build); a part whose filter matched nothing (a renamed file, a mistyped pattern)
// would otherwise pass having run nothing.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

namespace {

unsigned selected_cases = 0;

/// Records how many test cases passed the filters; reports nothing.
struct SelectedCases : doctest::IReporter {
    explicit SelectedCases(const doctest::ContextOptions&) {}
    void test_run_end(const doctest::TestRunStats& stats) override { selected_cases = stats.numTestCasesPassingFilters; }
    void report_query(const doctest::QueryData&) override {}
    void test_run_start() override {}
    void test_case_start(const doctest::TestCaseData&) override {}
    void test_case_reenter(const doctest::TestCaseData&) override {}
    void test_case_end(const doctest::CurrentTestCaseStats&) override {}
    void test_case_exception(const doctest::TestCaseException&) override {}
    void subcase_start(const doctest::SubcaseSignature&) override {}
    void subcase_end() override {}
    void log_assert(const doctest::AssertData&) override {}
    void log_message(const doctest::MessageData&) override {}
    void test_case_skipped(const doctest::TestCaseData&) override {}
};

} // namespace

DOCTEST_REGISTER_LISTENER("selected_cases", 1, SelectedCases);

int main(int argc, char** argv) {
    doctest::Context context(argc, argv);
    const int status = context.run();
    if (context.shouldExit() || status != 0) return status; // a query (--list-test-cases, --count...) or a failure
    if (selected_cases == 0) {
        std::fputs("no test case passes the filters given\n", stderr);
        return 1;
    }
    return status;
}
