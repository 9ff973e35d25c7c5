#pragma once
// A compile-time list of types, and the few operations the family list needs: index of a type,
// type at an index, concatenation without duplicates, and the std::variant of a list.

#include <cstddef>
#include <type_traits>
#include <variant>

namespace hypermoe {

template <class... Ts>
struct type_list {
    static constexpr std::size_t size = sizeof...(Ts);
};

namespace detail {

template <class T, class List>
struct index_of_impl;
template <class T, class... Ts>
struct index_of_impl<T, type_list<Ts...>> {
    static constexpr std::size_t value = [] {
        constexpr bool same[] = {std::is_same_v<T, Ts>...};
        for (std::size_t i = 0; i < sizeof...(Ts); ++i)
            if (same[i]) return i;
        return sizeof...(Ts);
    }();
    static_assert(value < sizeof...(Ts), "type not in the list");
};
/// Position of T in List (a compile error if absent).
template <class T, class List>
inline constexpr std::size_t index_of = index_of_impl<T, List>::value;

template <std::size_t I, class List>
struct type_at_impl;
template <std::size_t I, class T, class... Ts>
struct type_at_impl<I, type_list<T, Ts...>> : type_at_impl<I - 1, type_list<Ts...>> {};
template <class T, class... Ts>
struct type_at_impl<0, type_list<T, Ts...>> {
    using type = T;
};
/// The type at position I of List.
template <std::size_t I, class List>
using type_at = typename type_at_impl<I, List>::type;

template <class Acc, class... Lists>
struct unite_impl {
    using type = Acc;
};
template <class... As, class T, class... Ts, class... Lists>
struct unite_impl<type_list<As...>, type_list<T, Ts...>, Lists...>
    : unite_impl<std::conditional_t<(std::is_same_v<T, As> || ...), type_list<As...>, type_list<As..., T>>, type_list<Ts...>,
                 Lists...> {};
template <class... As, class... Lists>
struct unite_impl<type_list<As...>, type_list<>, Lists...> : unite_impl<type_list<As...>, Lists...> {};
/// The types of all Lists, in order of first appearance, each once.
template <class... Lists>
using unite = typename unite_impl<type_list<>, Lists...>::type;

template <class List>
struct variant_of_impl;
template <class... Ts>
struct variant_of_impl<type_list<Ts...>> {
    using type = std::variant<Ts...>;
};
/// std::variant<Ts...> of type_list<Ts...>.
template <class List>
using variant_of = typename variant_of_impl<List>::type;

} // namespace detail
} // namespace hypermoe
