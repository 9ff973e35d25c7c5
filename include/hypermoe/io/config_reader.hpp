#pragma once
// ConfigReader: typed, range-checked access to a config.json's values; every failure is a
// config_error naming the file, the key and what was expected.

#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "hypermoe/core/error.hpp"
#include "hypermoe/core/extents.hpp"
#include "hypermoe/detail/format.hpp"

namespace hypermoe {

/// Typed access to config.json values: config_error names the file, key and what was wrong.
class ConfigReader {
public:
    ConfigReader(const nlohmann::json& j, std::string file) : j_(j), file_(std::move(file)) {}

    [[nodiscard]] bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }
    /// Largest integer a config may give: sizes multiply (d x r, T x d x ff), and no width or
    /// count of a real model comes near 2^31, so products of two stay far from overflowing.
    static constexpr index_t max_integer = index_t{1} << 31;

    [[nodiscard]] index_t integer(const char* key, index_t min = 0) const {
        const auto& v = need(key);
        if (!v.is_number_integer()) bad(key, v, "an integer");
        if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(max_integer))
            throw config_error(detail::concat(file_, ": '", key, "' is ", v.dump(), ", expected <= ", max_integer));
        const index_t i = v.get<index_t>();
        if (i < min) throw config_error(detail::concat(file_, ": '", key, "' is ", i, ", expected >= ", min));
        if (i > max_integer) throw config_error(detail::concat(file_, ": '", key, "' is ", i, ", expected <= ", max_integer));
        return i;
    }
    [[nodiscard]] index_t integer_or(const char* key, index_t fallback, index_t min = 0) const {
        return has(key) ? integer(key, min) : fallback;
    }
    [[nodiscard]] double number(const char* key) const {
        const auto& v = need(key);
        if (!v.is_number()) bad(key, v, "a number");
        return v.get<double>();
    }
    [[nodiscard]] double number_or(const char* key, double fallback) const { return has(key) ? number(key) : fallback; }
    [[nodiscard]] bool boolean_or(const char* key, bool fallback) const {
        if (!has(key)) return fallback;
        const auto& v = j_.at(key);
        if (!v.is_boolean()) bad(key, v, "true or false");
        return v.get<bool>();
    }
    [[nodiscard]] std::string string_or(const char* key, std::string fallback) const {
        if (!has(key)) return fallback;
        const auto& v = j_.at(key);
        if (!v.is_string()) bad(key, v, "a string");
        return v.get<std::string>();
    }
    [[nodiscard]] std::vector<index_t> integers_or_empty(const char* key) const {
        std::vector<index_t> out;
        if (!has(key)) return out;
        const auto& v = j_.at(key);
        if (!v.is_array()) bad(key, v, "an array of integers");
        for (const auto& e : v) {
            if (!e.is_number_integer()) bad(key, v, "an array of integers");
            out.push_back(e.get<index_t>());
        }
        return out;
    }
    /// Requires `key` to equal one of the accepted strings (e.g. an activation we implement) and
    /// returns it.
    std::string expect_string(const char* key, std::string_view fallback, std::initializer_list<std::string_view> accepted) const {
        std::string v = string_or(key, std::string(fallback));
        for (const auto a : accepted)
            if (v == a) return v;
        std::string list;
        for (const auto a : accepted) list += (list.empty() ? "" : ", ") + std::string(a);
        throw config_error(detail::concat(file_, ": '", key, "' is \"", v, "\", supported: ", list));
    }
    [[nodiscard]] const std::string& file() const noexcept { return file_; }

private:
    const nlohmann::json& need(const char* key) const {
        if (!has(key)) throw config_error(detail::concat(file_, ": missing key '", key, "'"));
        return j_.at(key);
    }
    [[noreturn]] void bad(const char* key, const nlohmann::json& v, const char* expected) const {
        throw config_error(detail::concat(file_, ": '", key, "' is ", v.dump(), ", expected ", expected));
    }
    const nlohmann::json& j_;
    std::string file_;
};

} // namespace hypermoe
