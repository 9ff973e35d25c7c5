#pragma once
// Message building without <format> (missing in g++ 12 and clang 14).

#include <sstream>
#include <string>
#include <utility>

namespace hypermoe::detail {

template <class... Parts>
[[nodiscard]] std::string concat(const Parts&... parts) {
    std::ostringstream out;
    (out << ... << parts);
    return out.str();
}

/// "(rows, cols)" for messages.
template <class A, class B>
[[nodiscard]] std::string shape_str(const A& rows, const B& cols) {
    return concat('(', rows, ", ", cols, ')');
}

} // namespace hypermoe::detail
