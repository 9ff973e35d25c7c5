// Bitwise-equal outputs for 1, 2, 3, 4 and 8 OpenMP threads (oversubscribed on this 2-core
// machine, which is fine), for every family, backend, storage dtype and HyperMoE mode: the probe
// prints a hash of every output, run in a process of its own per thread count.
#include <doctest/doctest.h>

#include <array>
#include <cstdio>
#include <memory>
#include <string>

namespace {

std::string run_probe(int threads) {
    const std::string command = "OMP_NUM_THREADS=" + std::to_string(threads) + " " HYPERMOE_DETERMINISM_PROBE;
    std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(command.c_str(), "r"), pclose);
    REQUIRE(pipe != nullptr);
    std::string out;
    std::array<char, 4096> buffer{};
    while (std::fgets(buffer.data(), int(buffer.size()), pipe.get()) != nullptr) out += buffer.data();
    const int status = pclose(pipe.release());
    CHECK(status == 0);
    return out;
}

} // namespace

TEST_CASE("outputs are bitwise equal for 1, 2, 3, 4 and 8 OpenMP threads") {
    const std::string one = run_probe(1);
    CHECK(one.size() > 1000); // every family, backend, storage and mode printed a line
    // A sanitizer build (~10x slower) compares 3 against 1 only.
#ifdef HYPERMOE_TEST_SANITIZED
    for (const int threads : {3}) {
#else
    for (const int threads : {2, 3, 4, 8}) {
#endif
        CAPTURE(threads);
        const std::string other = run_probe(threads);
        if (other != one) {
            // Name the first line that differs.
            std::size_t a = 0;
            while (a < one.size() && a < other.size() && one[a] == other[a]) ++a;
            const std::size_t line = one.rfind('\n', a) == std::string::npos ? 0 : one.rfind('\n', a) + 1;
            MESSAGE("first difference: ", one.substr(line, one.find('\n', line) - line), " vs ",
                    other.substr(line, other.find('\n', line) - line));
        }
        CHECK(other == one);
    }
}
